"""The classification table against genuine Baileys 7.0.0-rc14 / libsignal 6.0.0 error output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.rules.classification import CLASSIFICATION_TABLE, ErrorClass, ErrorSource, classify
from tests.conftest import FIXTURES

BAILEYS = FIXTURES / "baileys"


def _lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (BAILEYS / name).read_text().splitlines() if line.strip()]


def _error_text(line: dict[str, Any]) -> str | None:
    err = line.get("err")
    if isinstance(err, dict):
        return str(err.get("message"))
    error = line.get("error")
    return error if isinstance(error, str) else None


# What each labelled golden line must be classified as (the product's reading of each error shape).
GOLDEN_EXPECTED = {
    "decrypt_fail.pkmsg_bad_mac": ErrorClass.BAD_MAC,
    "decrypt_fail.msg_bad_mac_wrapped": ErrorClass.BAD_MAC,
    "decrypt_fail.no_session_record": ErrorClass.NO_SESSION,
    "decrypt_fail.group_no_sender_key": ErrorClass.SENDER_KEY,
    "appstate.bad_decrypt_retrying": ErrorClass.BAD_DECRYPT,
    "appstate.bad_decrypt_giving_up": ErrorClass.BAD_DECRYPT,
    "appstate.invalid_patch_mac_skipped": ErrorClass.BAD_DECRYPT,
    "appstate.missing_key_giving_up": ErrorClass.OTHER,
    "appstate.missing_key_retry_snapshot": ErrorClass.OTHER,
    "appstate.missing_key_parked": ErrorClass.OTHER,
}


def golden_cases() -> list[tuple[str, str, ErrorSource]]:
    cases = []
    for entry in _lines("golden_lines.jsonl"):
        label, line = entry["label"], entry["line"]
        text = _error_text(line)
        if label in GOLDEN_EXPECTED and text is not None:
            source = ErrorSource.APP_STATE if label.startswith("appstate") else ErrorSource.MESSAGE
            cases.append((label, text, source))
    return cases


@pytest.mark.parametrize(("label", "text", "source"), golden_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_golden_lines(label: str, text: str, source: ErrorSource) -> None:
    assert classify(text, source) is GOLDEN_EXPECTED[label]
    # Runtimes that cannot tell the source get the same answer for message and app-state errors.
    assert classify(text) is GOLDEN_EXPECTED[label]


def test_every_expected_golden_label_is_in_the_samples() -> None:
    assert {label for label, _, _ in golden_cases()} == set(GOLDEN_EXPECTED)


SCENARIO_EXPECTED = {
    "msg_duplicate_delivery": ErrorClass.BAD_MAC,  # "No matching sessions found for message"
    "msg_tampered_mac": ErrorClass.BAD_MAC,
    "pkmsg_tampered_mac": ErrorClass.BAD_MAC,
    "msg_after_receiver_session_replaced": ErrorClass.BAD_MAC,
    "msg_with_corrupted_stored_session": ErrorClass.BAD_MAC,
    "msg_no_session": ErrorClass.NO_SESSION,
    "pkmsg_replayed_after_prekey_consumed_session_deleted": ErrorClass.PREKEY,
    "skmsg_without_sender_key": ErrorClass.SENDER_KEY,
    "skmsg_tampered_after_skdm": ErrorClass.SENDER_KEY,
    "skmsg_duplicate": ErrorClass.COUNTER,
}


def test_libsignal_scenario_errors() -> None:
    seen = {}
    for record in _lines("crypto_scenarios.results.jsonl"):
        error = record.get("error")
        if record["scenario"] in SCENARIO_EXPECTED and isinstance(error, dict):
            seen[record["scenario"]] = classify(error["message"], ErrorSource.MESSAGE)
    assert seen == SCENARIO_EXPECTED


def test_openssl_errors_count_for_app_state_and_never_for_media() -> None:
    records = {r["scenario"]: r for r in _lines("crypto_scenarios.results.jsonl")}
    bad_decrypt = records["aesDecrypt_wrong_key"]["error"]
    assert bad_decrypt["code"] == "ERR_OSSL_BAD_DECRYPT"
    assert classify(bad_decrypt["message"], ErrorSource.APP_STATE) is ErrorClass.BAD_DECRYPT
    assert classify(bad_decrypt["code"], ErrorSource.APP_STATE) is ErrorClass.BAD_DECRYPT
    assert classify(bad_decrypt["message"], ErrorSource.MEDIA) is ErrorClass.MEDIA
    assert classify(bad_decrypt["message"], ErrorSource.MESSAGE) is ErrorClass.OTHER
    patch_mac = records["decodeSyncdPatch_wrong_key_validateMacs=true"]["error"]["message"]
    assert classify(patch_mac, ErrorSource.APP_STATE) is ErrorClass.BAD_DECRYPT


def test_ciphertext_stub_parameters_from_the_app_event_stream() -> None:
    stubs = [
        line["messageStubParameters"][0]
        for line in _lines("session.app.jsonl")
        if line.get("event") == "messages.upsert" and line.get("messageStubType") == 2
    ]
    classes = [classify(text, ErrorSource.MESSAGE) for text in stubs]
    assert classes.count(ErrorClass.BAD_MAC) == sum(
        text in {"Bad MAC", "No matching sessions found for message"} for text in stubs
    )
    assert ErrorClass.BAD_MAC in classes and ErrorClass.NO_SESSION in classes


def test_not_a_crypto_error_is_other() -> None:
    assert classify("Message absent from node") is ErrorClass.OTHER
    assert classify("") is ErrorClass.OTHER


def test_table_rules_are_each_reachable() -> None:
    for rule in CLASSIFICATION_TABLE:
        source = next(iter(rule.sources - {None}), None) if rule.sources else None
        assert classify(f"Error: {rule.needle} at x", source) is rule.error_class, rule
