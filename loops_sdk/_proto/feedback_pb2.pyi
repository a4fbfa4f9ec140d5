# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackBatch(_message.Message):
    __slots__ = ("client_id", "sequence", "record_count", "payload_format", "payload", "sent_at_unix_ms", "epoch")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sequence: int
    record_count: int
    payload_format: int
    payload: bytes
    sent_at_unix_ms: int
    epoch: int
    def __init__(self, client_id: _Optional[str] = ..., sequence: _Optional[int] = ..., record_count: _Optional[int] = ..., payload_format: _Optional[int] = ..., payload: _Optional[bytes] = ..., sent_at_unix_ms: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("client_id", "sequence", "duplicate", "records_stored")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_STORED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sequence: int
    duplicate: bool
    records_stored: int
    def __init__(self, client_id: _Optional[str] = ..., sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ..., records_stored: _Optional[int] = ...) -> None: ...
