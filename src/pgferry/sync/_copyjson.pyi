def convert_block(
    block: bytes, parts: tuple[bytes, ...], key_head: bytes, pk_fields: tuple[int, ...], /
) -> tuple[bytes, bytes]: ...
def read_copy(
    get_copy_data: int,
    freemem: int,
    conn: int,
    parts: tuple[bytes, ...],
    key_head: bytes,
    pk_fields: tuple[int, ...],
    min_bytes: int,
    max_seconds: float,
    /,
) -> tuple[bytes, bytes, int]: ...
