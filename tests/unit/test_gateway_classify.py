"""Every row of the facts sheet's error table, and the refund object as the stages read it."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import requests

from cancel_scanner.gateway.classify import (
    AnswerTooLarge,
    CallNotSent,
    UnverifiedResponse,
    classify,
    classify_exception,
    classify_payment,
)
from cancel_scanner.gateway.contract import (
    Accepted,
    CloseSent,
    ConfigError,
    NotSent,
    PaymentState,
    Permanent,
    Refund,
    RefundRequest,
    RetryLater,
    UnknownOutcome,
)

REFUND_JSON = {
    "refund_id": "50000000382019052709732678859",
    "out_refund_no": "R20240501-1",
    "transaction_id": "1217752501201407033233368018",
    "out_trade_no": "O20240501-1",
    "channel": "ORIGINAL",
    "user_received_account": "支付用户零钱",
    "status": "PROCESSING",
    "create_time": "2024-05-01T10:00:00+08:00",
    "amount": {"total": 1280, "refund": 1280, "payer_total": 1280, "payer_refund": 1280, "currency": "CNY"},
}


def error_body(code: str, message: str = "details") -> str:
    return json.dumps({"code": code, "message": message})


@pytest.mark.parametrize(
    ("status", "code", "kind", "give_up_after"),
    [
        (500, "SYSTEM_ERROR", UnknownOutcome, None),
        (502, "SERVICE_UNAVAILABLE", UnknownOutcome, None),
        (503, "SERVICE_UNAVAILABLE", UnknownOutcome, None),
        (504, "GATEWAY_TIMEOUT", UnknownOutcome, None),  # any other 5xx
        (429, "FREQUENCY_LIMITED", UnknownOutcome, None),
        (403, "NOT_ENOUGH", RetryLater, None),
        (404, "RESOURCE_NOT_EXISTS", RetryLater, 3),
        (400, "PARAM_ERROR", Permanent, None),
        (400, "INVALID_REQUEST", Permanent, None),
        (403, "USER_ACCOUNT_ABNORMAL", Permanent, None),
        (403, "NO_AUTH", Permanent, None),
        (401, "SIGN_ERROR", ConfigError, None),
        (404, "MCH_NOT_EXISTS", ConfigError, None),
        (400, "SOMETHING_NEW", Permanent, None),  # any other 4xx
        (403, "SOMETHING_NEW", Permanent, None),
        (409, "CONFLICT", Permanent, None),
    ],
)
def test_each_error_answer_gets_the_outcome_of_the_table(status, code, kind, give_up_after):
    result = classify(status, error_body(code, "why it failed"), "REQ-1")

    assert type(result) is kind
    assert (result.code, result.message, result.request_id) == (code, "why it failed", "REQ-1")
    if kind is RetryLater:
        assert result.give_up_after == give_up_after


def test_a_200_with_a_refund_object_is_accepted():
    result = classify(200, json.dumps(REFUND_JSON), "REQ-1")

    assert isinstance(result, Accepted)
    assert result.request_id == "REQ-1"
    assert result.refund.status == "PROCESSING"
    assert result.refund.refund_amount == 1280


def test_a_200_given_as_bytes_is_read_the_same():
    assert isinstance(classify(200, json.dumps(REFUND_JSON).encode("utf-8"), None), Accepted)


@pytest.mark.parametrize(
    "body",
    ["", "<html>ok</html>", "[]", json.dumps({"code": "SYSTEM_ERROR"}), json.dumps({**REFUND_JSON, "status": "DONE"})],
)
def test_a_2xx_we_cannot_read_is_unknown_never_accepted(body):
    result = classify(200, body, None)

    assert isinstance(result, UnknownOutcome)
    assert result.code == "BAD_RESPONSE"


def test_an_error_without_wechats_error_shape_keeps_the_status_as_code():
    result = classify(502, "<html><body>Bad Gateway</body></html>", None)

    assert isinstance(result, UnknownOutcome)
    assert result.code == "HTTP_502"
    assert "Bad Gateway" in result.message


def test_a_401_is_a_configuration_error_whatever_its_code():
    assert isinstance(classify(401, "", None), ConfigError)


@pytest.mark.parametrize("status", [100, 301, 302, 304])
def test_a_status_outside_2xx_4xx_5xx_is_unknown(status):
    assert isinstance(classify(status, "", None), UnknownOutcome)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_unknown_whatever_its_body_says(status):
    result = classify(status, error_body("SUCCESS"), "REQ-3")

    assert isinstance(result, UnknownOutcome)
    assert (result.code, result.request_id) == ("REDIRECT", "REQ-3")
    assert str(status) in result.message


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (requests.ReadTimeout("read timed out"), "TIMEOUT"),
        (requests.Timeout("timed out"), "TIMEOUT"),
        (requests.ConnectTimeout("connect timed out"), "CONNECT_TIMEOUT"),
        (requests.ConnectionError("reset by peer"), "CONNECTION_ERROR"),
        (requests.exceptions.ChunkedEncodingError("broken"), "HTTP_ERROR"),
        (Exception("failed to verify the signature"), "BAD_SIGNATURE"),
        (Exception("wechatpayv3 does not support this algorithm: "), "BAD_SIGNATURE"),
        (UnverifiedResponse("unexpected serial"), "BAD_SIGNATURE"),
        (AnswerTooLarge("over the cap"), "ANSWER_TOO_LARGE"),
    ],
)
def test_transport_and_signature_failures_are_unknown(exc, code):
    result = classify_exception(exc, "REQ-9")

    assert isinstance(result, UnknownOutcome)
    assert (result.code, result.request_id) == (code, "REQ-9")


def test_a_call_given_up_before_sending_is_not_sent():
    result = classify_exception(CallNotSent("DEADLINE", "no pacing slot early enough"))

    assert isinstance(result, NotSent)
    assert (result.code, result.message, result.request_id) == ("DEADLINE", "no pacing slot early enough", None)


class _LookAlike(Exception):
    pass


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), KeyError("amount"), Exception("something else"), _LookAlike("failed to verify the signature")],
)
def test_programming_errors_are_not_classified_so_they_raise(exc):
    assert classify_exception(exc) is None


def test_describe_is_code_and_message_within_255_characters():
    short = Permanent("INVALID_REQUEST", "amount differs")
    long = UnknownOutcome("SYSTEM_ERROR", "x" * 1000)

    assert short.describe() == "INVALID_REQUEST: amount differs"
    assert len(long.describe()) == 255
    assert long.describe().startswith("SYSTEM_ERROR: xxx")


def test_refund_times_are_read_as_naive_utc():
    refund = Refund.from_json({**REFUND_JSON, "status": "SUCCESS", "success_time": "2024-05-01T10:00:05+08:00"})

    assert refund.create_time == datetime(2024, 5, 1, 2, 0, 0)
    assert refund.success_time == datetime(2024, 5, 1, 2, 0, 5)
    assert refund.is_final


def test_a_refund_time_without_offset_is_rejected():
    with pytest.raises(ValueError):
        Refund.from_json({**REFUND_JSON, "create_time": "2024-05-01T10:00:00"})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(out_refund_no="R|1"),
        dict(out_refund_no=""),
        dict(out_refund_no="R" * 65),
        dict(out_refund_no="退款1"),
        dict(refund_amount=0),
        dict(refund_amount=True),
        dict(refund_amount=1281),
        dict(total_amount=-1),
        dict(out_trade_no=""),
        dict(out_trade_no="O" * 33),
        dict(reason="理" * 27),  # 81 bytes of UTF-8
    ],
)
def test_a_refund_request_that_wechat_would_refuse_is_rejected_before_sending(kwargs):
    fields = dict(out_refund_no="R-1_a", out_trade_no="O1", refund_amount=1280, total_amount=1280)
    fields.update(kwargs)

    with pytest.raises(ValueError):
        RefundRequest(**fields)


def test_a_valid_refund_request_is_kept_as_given():
    req = RefundRequest("R-1_a", "O1", 1000, 1280, reason="缺货")

    assert (req.out_refund_no, req.refund_amount, req.total_amount, req.reason) == ("R-1_a", 1000, 1280, "缺货")


# --- payments: query and close ---------------------------------------------------------------

PAID = {
    "out_trade_no": "SO1",
    "trade_state": "SUCCESS",
    "transaction_id": "4200",
    "success_time": "2026-11-01T10:00:00+08:00",
    "amount": {"total": 500},
}

# "paid" without the fields a payment is booked from (transaction id, success time)
PAID_WITHOUT_A_TRANSACTION = '{"out_trade_no":"SO1","trade_state":"SUCCESS","amount":{"total":500}}'


@pytest.mark.parametrize(
    "call, status, body, kind, code",
    [
        ("pay_close", 204, "", CloseSent, "CLOSE_ANSWERED"),
        ("pay_close", 400, '{"code":"ORDER_CLOSED","message":"closed"}', CloseSent, "CLOSE_ANSWERED"),
        ("pay_close", 202, '{"code":"USER_PAYING","message":"paying"}', RetryLater, "USER_PAYING"),
        ("pay_close", 400, '{"code":"ORDERPAID","message":"paid"}', Permanent, "ORDERPAID"),
        # not WeChat's 204: proves nothing
        ("pay_close", 200, '{"trade_state":"CLOSED"}', UnknownOutcome, "BAD_RESPONSE"),
        ("pay_close", 302, "", UnknownOutcome, "REDIRECT"),
        ("pay_close", 500, '{"code":"SYSTEM_ERROR","message":"x"}', UnknownOutcome, "SYSTEM_ERROR"),
        ("pay_query", 404, '{"code":"ORDER_NOT_EXIST","message":"no"}', Permanent, "ORDER_NOT_EXIST"),
        ("pay_query", 404, '{"code":"ORDERNOTEXIST","message":"no"}', Permanent, "ORDERNOTEXIST"),
        ("pay_query", 401, '{"code":"SIGN_ERROR","message":"x"}', ConfigError, "SIGN_ERROR"),
        ("pay_query", 429, '{"code":"FREQUENCY_LIMITED","message":"x"}', UnknownOutcome, "FREQUENCY_LIMITED"),
        ("pay_query", 200, "not json", UnknownOutcome, "BAD_RESPONSE"),
        ("pay_query", 200, '{"out_trade_no":"SO1","trade_state":"PAID_MAYBE"}', UnknownOutcome, "BAD_RESPONSE"),
        ("pay_query", 200, PAID_WITHOUT_A_TRANSACTION, UnknownOutcome, "BAD_RESPONSE"),  # not believed
    ],
)
def test_a_payment_answer_is_classified_by_what_it_proves(call, status, body, kind, code):
    result = classify_payment(call, status, body, "RID")
    assert type(result) is kind and result.code == code


def test_a_paid_trade_is_read_with_its_transaction_amount_and_utc_time():
    result = classify_payment("pay_query", 200, json.dumps(PAID), "RID")
    assert isinstance(result, PaymentState) and result.payment.paid
    assert (result.payment.transaction_id, result.payment.total, result.payment.success_time.hour) == ("4200", 500, 2)
