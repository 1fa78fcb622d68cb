"""The browser tests' Chromium set-up without a browser: where Chromium is missing and cannot be installed,
`make test` skips them with the install command and `make test-browser` (DKL_BROWSER_REQUIRED=1) fails."""
import os

import pytest

import browser


@pytest.fixture
def no_chromium(tmp_path, monkeypatch):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "chromium"))  # not there
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)       # and no apt-get


def test_missing_chromium_skips_with_the_install_command(no_chromium, monkeypatch):
    monkeypatch.delenv("DKL_BROWSER_REQUIRED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        browser.ensure_chromium()
    monkeypatch.setenv("DKL_BROWSER_REQUIRED", "0")
    with pytest.raises(pytest.skip.Exception):
        browser.ensure_chromium()


def test_missing_chromium_fails_when_the_browser_tests_are_required(no_chromium, monkeypatch):
    monkeypatch.setenv("DKL_BROWSER_REQUIRED", "1")
    with pytest.raises(RuntimeError, match="cannot be installed from here; run as root: apt-get"):
        browser.ensure_chromium()


def test_make_test_browser_requires_the_browser():
    makefile = open(os.path.join(os.path.dirname(__file__), "..", "Makefile"), encoding="utf-8").read()
    assert "test-browser: export DKL_BROWSER_REQUIRED = 1" in makefile


def test_an_existing_chromium_is_used(tmp_path, monkeypatch):
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n", encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setattr(browser, "CHROMIUM", str(exe))
    assert browser.ensure_chromium() == str(exe)
