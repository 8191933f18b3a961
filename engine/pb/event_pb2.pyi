from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    INSTANCE_CREATED: _ClassVar[EventType]
    INSTANCE_RUNNING: _ClassVar[EventType]
    INSTANCE_FAILED: _ClassVar[EventType]
    INSTANCE_RELEASED: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
INSTANCE_CREATED: EventType
INSTANCE_RUNNING: EventType
INSTANCE_FAILED: EventType
INSTANCE_RELEASED: EventType

class InstanceSpec(_message.Message):
    __slots__ = ("cpus", "memory_mb", "gpu", "image")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    cpus: int
    memory_mb: int
    gpu: str
    image: str
    def __init__(self, cpus: _Optional[int] = ..., memory_mb: _Optional[int] = ..., gpu: _Optional[str] = ..., image: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_type", "instance_id", "user_id", "name", "spec", "timestamp", "product_id", "stream_id", "sale_id", "slot", "endpoint", "reason")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SALE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_type: EventType
    instance_id: int
    user_id: int
    name: str
    spec: InstanceSpec
    timestamp: int
    product_id: int
    stream_id: str
    sale_id: str
    slot: int
    endpoint: str
    reason: str
    def __init__(self, event_type: _Optional[_Union[EventType, str]] = ..., instance_id: _Optional[int] = ..., user_id: _Optional[int] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[InstanceSpec, _Mapping]] = ..., timestamp: _Optional[int] = ..., product_id: _Optional[int] = ..., stream_id: _Optional[str] = ..., sale_id: _Optional[str] = ..., slot: _Optional[int] = ..., endpoint: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
