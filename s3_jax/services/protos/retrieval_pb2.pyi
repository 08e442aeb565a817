from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "packed", "rows_only")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    ROWS_ONLY_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedScalarFieldContainer[bytes]
    k: int
    packed: bool
    rows_only: bool
    def __init__(self, queries: _Optional[_Iterable[bytes]] = ..., k: _Optional[int] = ..., packed: _Optional[bool] = ..., rows_only: _Optional[bool] = ...) -> None: ...

class ScoredDoc(_message.Message):
    __slots__ = ("id", "title", "text", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    score: float
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class DocList(_message.Message):
    __slots__ = ("docs",)
    DOCS_FIELD_NUMBER: _ClassVar[int]
    docs: _containers.RepeatedCompositeFieldContainer[ScoredDoc]
    def __init__(self, docs: _Optional[_Iterable[_Union[ScoredDoc, _Mapping]]] = ...) -> None: ...

class PackedResults(_message.Message):
    __slots__ = ("counts", "scores", "rows", "row_ids")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    counts: bytes
    scores: bytes
    rows: bytes
    row_ids: bytes
    def __init__(self, counts: _Optional[bytes] = ..., scores: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., row_ids: _Optional[bytes] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "packed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DocList]
    packed: PackedResults
    def __init__(self, results: _Optional[_Iterable[_Union[DocList, _Mapping]]] = ..., packed: _Optional[_Union[PackedResults, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "kind", "count", "corpus_sha256", "index_dir")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIR_FIELD_NUMBER: _ClassVar[int]
    status: str
    kind: str
    count: int
    corpus_sha256: str
    index_dir: str
    def __init__(self, status: _Optional[str] = ..., kind: _Optional[str] = ..., count: _Optional[int] = ..., corpus_sha256: _Optional[str] = ..., index_dir: _Optional[str] = ...) -> None: ...
