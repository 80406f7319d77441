"""Schemathesis checks of Article 7 Relay's control API, loaded by tests/control_schemathesis.rs
(SCHEMATHESIS_HOOKS=relay_checks).

`schema_valid_request_is_read` replaces schemathesis's `positive_data_acceptance`: a request
the document calls valid may still be refused by a rule no schema can state (a consent
signature that does not verify, a key that is not a curve point, a partner id taken): those
refusals carry their own codes (CONSENT_INVALID, KEYS_INVALID, ALREADY_EXISTS, ...) or a
REQUEST_MALFORMED that names the field and the rule. What must never happen is the drift this
test exists for: a schema-valid request the relay could not even read, a body, a number or a
path parameter of the documented type and range refused as REQUEST_MALFORMED with the
reader's own complaint.
"""

import schemathesis

# How the relay words a REQUEST_MALFORMED for input it could not read (relay/src/http/body.rs
# and api.rs): a body that does not deserialize, a path or query number out of its type.
UNREADABLE = (
    "body: ",
    "path: ",
    "is not a number in range",
    "is not a network id",
    "is not 1 to 32 hex digits",
)


@schemathesis.check
def schema_valid_request_is_read(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code != 400:
        return None
    try:
        error = response.json()["error"]
    except Exception as e:
        raise AssertionError(f"a 400 answer without the documented error body: {e}")
    message = error.get("message", "")
    if error.get("code") == 600 and any(marker in message for marker in UNREADABLE):
        raise AssertionError(
            "a request the document calls valid was refused as unreadable: " + message
        )
    return None
