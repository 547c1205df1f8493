"""The numba kernel behind :mod:`circuits_core._unit_scan` (imported only when it runs: numba
is heavy, and optional for circuits_core). Each function stays callable as plain Python through
``.py_func`` (the tests check the compiled and the plain versions agree)."""

from __future__ import annotations

from circuits_core.jit import prepare_numba

_CACHE = prepare_numba() is not None  # no writable folder: compile in memory only

from numba import njit  # noqa: E402 - after the cache folder is chosen

@njit(cache=_CACHE, nogil=True)
def _varint(buf, pos, end):  # -> (value, next position); next = -1 on a malformed varint
    result = 0
    shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        pos += 1
        result |= (int(byte) & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    return 0, -1


@njit(cache=_CACHE, nogil=True)
def _skip(buf, pos, end, wire_type):  # -> next position after a field's value; -1 if malformed
    if wire_type == 0:
        _, pos = _varint(buf, pos, end)
        return pos
    if wire_type == 1:
        return pos + 8 if pos + 8 <= end else -1
    if wire_type == 5:
        return pos + 4 if pos + 4 <= end else -1
    if wire_type == 2:
        length, pos = _varint(buf, pos, end)
        if pos < 0 or length > end - pos:
            return -1
        return pos + length
    return -1  # groups (3/4) and reserved wire types: not produced for this schema


@njit(cache=_CACHE, nogil=True)
def _tag(buf, pos, end):  # -> (field number, wire type, next position); next = -1 if malformed
    tag, pos = _varint(buf, pos, end)
    return tag >> 3, tag & 7, pos


@njit(cache=_CACHE, nogil=True)
def _int32(value):  # protobuf int32 from its varint (negative values are sign-extended to 64 bits)
    low = value & 0xFFFFFFFF
    return low - 0x100000000 if low >= 0x80000000 else low


@njit(cache=_CACHE, nogil=True)
def _scan_units(buf, ints, token_end, flags, value_bytes):
    # Fills row i of the outputs from the i-th unit; returns the number of units read, or -1 when
    # the bytes are not a well-formed Graph (or hold more units than the outputs have rows).
    end = buf.shape[0]
    capacity = ints.shape[0]
    pos = 0
    row = 0
    while pos < end:
        field, wire_type, pos = _tag(buf, pos, end)
        if pos < 0:
            return -1
        if field != 5:
            pos = _skip(buf, pos, end, wire_type)
            if pos < 0:
                return -1
            continue
        if wire_type != 2 or row >= capacity:
            return -1
        length, pos = _varint(buf, pos, end)
        if pos < 0 or length > end - pos:
            return -1
        stop = pos + length
        while pos < stop:
            field, wire_type, pos = _tag(buf, pos, stop)
            if pos < 0:
                return -1
            if 1 <= field <= 4:  # layer, index, position, kind: int32 / enum varints
                if wire_type != 0:
                    return -1
                value, pos = _varint(buf, pos, stop)
                if pos < 0:
                    return -1
                column = field - 1 if field <= 2 else (3 if field == 3 else 2)
                ints[row, column] = _int32(value)
                if field == 3:
                    flags[row, 0] = True
            elif field == 7 or field == 8 or field == 10:  # activation, attribution, probability
                if wire_type != 1 or pos + 8 > stop:
                    return -1
                column = 0 if field == 7 else (1 if field == 8 else 2)
                for j in range(8):
                    value_bytes[row, column * 8 + j] = buf[pos + j]
                if field != 10:
                    flags[row, column + 1] = True
                pos += 8
            elif field == 9:  # token
                if wire_type != 2:
                    return -1
                length, pos = _varint(buf, pos, stop)
                if pos < 0 or length > stop - pos:
                    return -1
                ints[row, 4] = pos
                token_end[row] = pos + length
                pos += length
            else:
                pos = _skip(buf, pos, stop, wire_type)
                if pos < 0:
                    return -1
        if pos != stop:
            return -1
        row += 1
    return row
