"""The ctypes bindings (device_sdk.hazmat): bound through the right library, refused clearly.

Each refusal here is real: a library that exists but lacks the function (libc has no libssl
calls), a library path that does not exist, an object that is not CPython's SSLContext.
"""

from __future__ import annotations

import _ssl
import ctypes.util
import ssl

import pytest

from device_sdk import CipherPolicyError, KeyStoreError, ciphers, tpm_keystore
from device_sdk.hazmat import MissingBinding, cpython, libc, libcrypto, libssl

LIBC = ctypes.util.find_library("c")


def test_libssl_functions_bind_through_cpythons_ssl_and_read_a_context() -> None:
    context = ssl.create_default_context()
    address = cpython.ssl_ctx_pointer(context)
    assert libssl.through(_ssl.__file__).SSL_CTX_get_options(address) == int(context.options)
    assert libssl.through(_ssl.__file__) is libssl.through(_ssl.__file__)  # bound once


def test_a_function_the_library_lacks_is_refused_naming_it_and_the_library() -> None:
    lib = libssl.LibSsl(LIBC)  # libc links no libssl: a real missing symbol
    with pytest.raises(MissingBinding) as missing:
        lib.SSL_CTX_set_ciphersuites(None, b"")
    assert missing.value.name == "SSL_CTX_set_ciphersuites"
    assert f"libssl (through {LIBC}) has no SSL_CTX_set_ciphersuites" in str(missing.value)
    with pytest.raises(MissingBinding, match=r"libcrypto .* has no OSSL_PROVIDER_load"):
        libcrypto.LibCrypto(LIBC).OSSL_PROVIDER_load(None, b"default")


def test_a_library_that_cannot_be_loaded_is_refused_naming_the_path() -> None:
    with pytest.raises(MissingBinding, match=r"cannot load libssl through /nonexistent/_ssl\.so"):
        libssl.LibSsl("/nonexistent/_ssl.so")


def test_only_cpythons_own_sslcontext_is_read() -> None:
    with pytest.raises(MissingBinding, match=r"not CPython's ssl\.SSLContext"):
        cpython.ssl_ctx_pointer(object())  # type: ignore[arg-type]


def test_prctl_binds_from_the_process_and_keeps_errno() -> None:
    lib = libc.process()
    assert lib.prctl(-1, 0, 0, 0, 0) == -1  # no such option
    assert libc.last_errno() == 22  # EINVAL


def test_a_missing_libssl_function_becomes_the_cipher_policys_advice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ciphers.cpython, "STDLIB_SSL_EXTENSION", LIBC)
    with pytest.raises(CipherPolicyError) as refused:
        ciphers.set_tls13_suites(ssl.create_default_context(), ciphers.CHACHA20_SUITES)
    assert "has no SSL_CTX_get_options" in refused.value.message
    assert "OPENSSL_CONF" in refused.value.message


def test_a_missing_provider_api_becomes_the_tpm_stores_advice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tpm_keystore.cpython, "STDLIB_SSL_EXTENSION", LIBC)
    with pytest.raises(KeyStoreError) as refused:
        tpm_keystore._provider_api()
    assert "has no OSSL_PROVIDER_load" in refused.value.message
    assert "OPENSSL_CONF" in refused.value.message
