"""The numba kernel behind :mod:`circuits_core._graph_scan` (imported only when it runs: numba
is heavy, and optional for circuits_core). Each function stays callable as plain Python through
``.py_func`` (the tests check the compiled and the plain versions agree).

The scan accepts only the shapes a protobuf serializer writes for ``circuits.v1.Graph``: packed
edge columns, one ``edges`` field, valid UTF-8 in every unit string. Anything else - malformed
bytes, an unpacked column, unit labels (nested messages the scan does not read) - makes it
decline, and the caller parses the message with protobuf instead, so what is accepted and what
is refused never depends on the scan.
"""

from __future__ import annotations

import numpy as np

from circuits_core.jit import prepare_numba

_CACHE = prepare_numba() is not None  # no writable folder: compile in memory only

from numba import njit  # noqa: E402 - after the cache folder is chosen

#: Status codes (the scan's first result when negative).
MALFORMED = -1  # not a well-formed Graph (protobuf's parse says why)
DECLINED = -2  # well-formed, but outside what the scan reads (protobuf's parse reads it)
#: Most byte ranges of header fields (everything but units and edges) the scan records.
MAX_HEADER_RANGES = 16


@njit(cache=_CACHE, nogil=True)
def _varint(buf, pos, end):  # -> (value, next position); next = -1 on a malformed varint
    result = 0
    shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        result |= (int(byte) & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    return 0, -1


@njit(cache=_CACHE, nogil=True)
def _skip(buf, pos, end, wire_type):  # -> next position after a field's value; -1 if malformed or a group
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
    return -1  # groups (3/4) and reserved wire types: protobuf's parse decides


@njit(cache=_CACHE, nogil=True)
def _tag(buf, pos, end):  # -> (field number, wire type, next position); next = -1 if malformed
    tag, pos = _varint(buf, pos, end)
    if tag >> 3 == 0 or tag > 0xFFFFFFFF:  # field number 0, or a tag over 32 bits: corrupt for protobuf
        return 0, 0, -1
    return tag >> 3, tag & 7, pos


@njit(cache=_CACHE, nogil=True)
def _int32(value):  # protobuf int32 from its varint (negative values are sign-extended to 64 bits)
    low = value & 0xFFFFFFFF
    return low - 0x100000000 if low >= 0x80000000 else low


@njit(cache=_CACHE, nogil=True)
def _utf8(buf, pos, end):  # whether buf[pos:end] is valid UTF-8 (what protobuf requires of a string)
    while pos < end:
        byte = buf[pos]
        if byte < 0x80:
            pos += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= byte <= 0xDF:
            more = 1
        elif byte == 0xE0:
            more, lo = 2, 0xA0
        elif byte == 0xED:
            more, hi = 2, 0x9F  # no UTF-16 surrogates
        elif 0xE1 <= byte <= 0xEF:
            more = 2
        elif byte == 0xF0:
            more, lo = 3, 0x90
        elif 0xF1 <= byte <= 0xF3:
            more = 3
        elif byte == 0xF4:
            more, hi = 3, 0x8F  # nothing above U+10FFFF
        else:
            return False
        if pos + more >= end:  # truncated sequence
            return False
        second = buf[pos + 1]
        if second < lo or second > hi:
            return False
        for j in range(2, more + 1):
            if buf[pos + j] < 0x80 or buf[pos + j] > 0xBF:
                return False
        pos += more + 1
    return True


@njit(cache=_CACHE, nogil=True)
def _scan_unit(buf, pos, stop, row, ints, token_end, flags, value_bytes):  # -> status (0 = read)
    while pos < stop:
        field, wire_type, pos = _tag(buf, pos, stop)
        if pos < 0:
            return MALFORMED
        if 1 <= field <= 4:  # layer, index, position, kind: int32 / enum varints
            if wire_type != 0:
                return DECLINED
            value, pos = _varint(buf, pos, stop)
            if pos < 0:
                return MALFORMED
            column = field - 1 if field <= 2 else (3 if field == 3 else 2)
            ints[row, column] = _int32(value)
            if field == 3:
                flags[row, 0] = True
        elif field == 7 or field == 8 or field == 10:  # activation, attribution, probability
            if wire_type != 1:
                return DECLINED
            if pos + 8 > stop:
                return MALFORMED
            column = 0 if field == 7 else (1 if field == 8 else 2)
            for j in range(8):
                value_bytes[row, column * 8 + j] = buf[pos + j]
            if field != 10:
                flags[row, column + 1] = True
            pos += 8
        elif field == 5 or field == 6 or field == 9 or field == 13:  # label, input_label, token, cluster
            if wire_type != 2:
                return DECLINED
            length, pos = _varint(buf, pos, stop)
            if pos < 0 or length > stop - pos:
                return MALFORMED
            if not _utf8(buf, pos, pos + length):
                return MALFORMED
            if field == 9:
                ints[row, 4] = pos
                token_end[row] = pos + length
            pos += length
        elif field == 12:  # labels: nested messages with strings of their own
            return DECLINED
        else:  # appearance_count and fields unknown to this schema: skipped, as protobuf keeps them aside
            pos = _skip(buf, pos, stop, wire_type)
            if pos < 0:
                return DECLINED  # a group, or malformed: protobuf's parse decides
    return 0 if pos == stop else MALFORMED


@njit(cache=_CACHE, nogil=True)
def _packed_uint32(buf, pos, stop):  # -> (values, status); status 0 = read
    count = 0
    for i in range(pos, stop):
        if buf[i] < 0x80:
            count += 1
    out = np.empty(count, dtype=np.int64)
    row = 0
    while pos < stop:
        value, pos = _varint(buf, pos, stop)
        if pos < 0:
            return out, MALFORMED
        if value > 0xFFFFFFFF:
            return out, DECLINED  # protobuf truncates such a value; let it
        out[row] = value
        row += 1
    return out, 0


@njit(cache=_CACHE, nogil=True)
def _top_level(buf, spans):  # -> (units or status, edges start, edges stop); fills the header spans
    end = buf.shape[0]
    units = 0
    edges_start = -1
    edges_stop = -1
    n_header = 0
    pos = 0
    while pos < end:
        start = pos
        field, wire_type, pos = _tag(buf, pos, end)
        if pos < 0:
            return MALFORMED, -1, -1
        if field == 5 or field == 6:
            if wire_type != 2:
                return DECLINED, -1, -1
            length, pos = _varint(buf, pos, end)
            if pos < 0 or length > end - pos:
                return MALFORMED, -1, -1
            if field == 5:
                units += 1
            elif edges_start >= 0:  # a second edges field: protobuf merges them; let it
                return DECLINED, -1, -1
            else:
                edges_start, edges_stop = pos, pos + length
            pos += length
            continue
        pos = _skip(buf, pos, end, wire_type)
        if pos < 0:
            return DECLINED, -1, -1  # a group, or malformed: protobuf's parse decides
        if n_header and spans[1 + n_header, 1] == start:
            spans[1 + n_header, 1] = pos  # extends the previous range
        elif n_header < MAX_HEADER_RANGES:
            spans[2 + n_header, 0] = start
            spans[2 + n_header, 1] = pos
            n_header += 1
        else:
            return DECLINED, -1, -1
    return units, edges_start, edges_stop


@njit(cache=_CACHE, nogil=True)
def _edge_table(buf, pos, stop, spans):  # -> (src, tgt, status); weight spans into rows 0 and 1
    src = np.empty(0, dtype=np.int64)
    tgt = np.empty(0, dtype=np.int64)
    seen = np.zeros(5, dtype=np.bool_)
    while pos < stop:
        field, wire_type, pos = _tag(buf, pos, stop)
        if pos < 0:
            return src, tgt, MALFORMED
        if 1 <= field <= 4:
            if wire_type != 2 or seen[field]:
                return src, tgt, DECLINED  # an unpacked or split column: protobuf joins the parts
            seen[field] = True
            length, pos = _varint(buf, pos, stop)
            if pos < 0 or length > stop - pos:
                return src, tgt, MALFORMED
            if field <= 2:
                values, status = _packed_uint32(buf, pos, pos + length)
                if status < 0:
                    return src, tgt, status
                if field == 1:
                    src = values
                else:
                    tgt = values
            else:
                if length % 8:
                    return src, tgt, MALFORMED
                spans[field - 3, 0] = pos
                spans[field - 3, 1] = pos + length
            pos += length
        else:
            pos = _skip(buf, pos, stop, wire_type)
            if pos < 0:
                return src, tgt, DECLINED
    return src, tgt, 0


@njit(cache=_CACHE, nogil=True)
def scan_graph(buf):
    """Read a serialized Graph in one pass over its units and edges.

    Returns ``(status, ints, token_end, flags, value_bytes, src, tgt, spans)``: ``status`` is the
    number of units, or MALFORMED / DECLINED; per unit row, ``ints`` = layer, index, kind,
    position, token start; ``flags`` = has position / activation / attribution; ``value_bytes``
    = activation, attribution, probability as little-endian doubles (0.0 when absent); ``src`` /
    ``tgt`` the edge endpoints; ``spans`` = byte ranges (start, end) of the packed weight and
    raw_weight columns (rows 0 and 1) and, from row 2 on, of the header fields (everything but
    units and edges, in order), -1 where absent.
    """
    spans = np.full((2 + MAX_HEADER_RANGES, 2), -1, dtype=np.int64)
    units, edges_start, edges_stop = _top_level(buf, spans)
    n = max(units, 0)
    ints = np.zeros((n, 5), dtype=np.int64)
    token_end = np.zeros(n, dtype=np.int64)
    flags = np.zeros((n, 3), dtype=np.bool_)
    value_bytes = np.zeros((n, 24), dtype=np.uint8)
    src = np.empty(0, dtype=np.int64)
    tgt = np.empty(0, dtype=np.int64)
    if units < 0:
        return units, ints, token_end, flags, value_bytes, src, tgt, spans
    end = buf.shape[0]
    row = 0
    pos = 0
    while pos < end and row < units:  # the bytes are known well-formed at this level
        field, wire_type, pos = _tag(buf, pos, end)
        if field == 5:
            length, pos = _varint(buf, pos, end)
            status = _scan_unit(buf, pos, pos + length, row, ints, token_end, flags, value_bytes)
            if status < 0:
                return status, ints, token_end, flags, value_bytes, src, tgt, spans
            row += 1
            pos += length
        else:
            pos = _skip(buf, pos, end, wire_type)
    if edges_start >= 0:
        src, tgt, status = _edge_table(buf, edges_start, edges_stop, spans)
        if status < 0:
            return status, ints, token_end, flags, value_bytes, src, tgt, spans
    return units, ints, token_end, flags, value_bytes, src, tgt, spans


_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_NEURON = 1  # graph_pb2.UNIT_KIND_NEURON
_LOGIT = 3  # graph_pb2.UNIT_KIND_LOGIT


@njit(cache=_CACHE, nogil=True)
def _distinct_unit_keys(layer, index, position):  # -> whether no two units share (layer, index, position)
    n = layer.shape[0]
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, dtype=np.int64)
    for i in range(n):
        h = np.uint64(layer[i]) * np.uint64(0x9E3779B97F4A7C15)
        h ^= np.uint64(index[i]) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.uint64(position[i]) * np.uint64(0x165667B19E3779F9)
        s = np.int64(h >> np.uint64(64 - bits))
        while True:
            j = slots[s]
            if j < 0:
                slots[s] = i
                break
            if layer[j] == layer[i] and index[j] == index[i] and position[j] == position[i]:
                return False
            s = (s + 1) & mask
    return True


@njit(cache=_CACHE, nogil=True)
def graph_columns(layer, index, kind, position, has_position, has_activation, has_attribution, activation,
                  attribution, probability, src, tgt, weight, num_layers, d_mlp, max_layer, max_neuron):  # fmt: skip
    """The aggregator's columns of a scanned graph, checked in one pass, when the graph passes every
    check graph readers make (then the result equals what the reference reader builds); ``ok`` is
    False at the first failed check, and the caller runs the reference reader, which says what is
    wrong. ``num_layers`` / ``d_mlp``: the model shape the graph states (0 = not stated).

    Returns ``(ok, unit_layer, unit_neuron, unit_activation, unit_attribution, edge_src_layer,
    edge_src_neuron, edge_tgt_layer, edge_tgt_neuron, edge_weight, logit_src_layer,
    logit_src_neuron, logit_token_id, logit_weight, logit_rows)``: neuron units (NaN where an
    activation / attribution is absent), neuron -> neuron edges, neuron -> logit links (with the
    logit units' rows), each in graph order.
    """
    n = layer.shape[0]
    e = src.shape[0]
    keyed_position = np.empty(n, dtype=np.int64)
    neurons = 0
    ok = True
    for i in range(n):
        k = kind[i]
        lay = layer[i]
        idx = index[i]
        pos = position[i] if has_position[i] else -1  # NO_POSITION
        keyed_position[i] = pos
        if k < _NEURON or k > _LOGIT:
            ok = False
        elif not (_INT32_MIN <= lay <= _INT32_MAX and _INT32_MIN <= idx <= _INT32_MAX and _INT32_MIN <= pos <= _INT32_MAX):
            ok = False
        elif not (np.isfinite(activation[i]) and np.isfinite(attribution[i]) and np.isfinite(probability[i])):
            ok = False  # an absent value reads 0.0, so a non-finite one was sent
        elif k == _NEURON:
            if lay < 0 or lay > max_layer or idx < 0 or idx > max_neuron:
                ok = False
            elif (num_layers > 0 and lay >= num_layers) or (d_mlp > 0 and idx >= d_mlp):
                ok = False
            neurons += 1
        if not ok:
            break
    keep = 0
    links = 0
    if ok:
        for j in range(e):
            s = src[j]
            t = tgt[j]
            if s < 0 or s >= n or t < 0 or t >= n or not np.isfinite(weight[j]):
                ok = False
                break
            if kind[s] == _NEURON:
                if kind[t] == _NEURON:
                    keep += 1
                elif kind[t] == _LOGIT:
                    if index[t] < 0:
                        ok = False
                        break
                    links += 1
    if ok and n > 1:
        ok = _distinct_unit_keys(layer, index, keyed_position)
    if not ok:
        neurons = keep = links = 0
    unit_layer = np.empty(neurons, dtype=np.int32)
    unit_neuron = np.empty(neurons, dtype=np.int32)
    unit_activation = np.empty(neurons, dtype=np.float64)
    unit_attribution = np.empty(neurons, dtype=np.float64)
    src_layer = np.empty(keep, dtype=np.int32)
    src_neuron = np.empty(keep, dtype=np.int32)
    tgt_layer = np.empty(keep, dtype=np.int32)
    tgt_neuron = np.empty(keep, dtype=np.int32)
    edge_weight = np.empty(keep, dtype=np.float64)
    logit_layer = np.empty(links, dtype=np.int32)
    logit_neuron = np.empty(links, dtype=np.int32)
    logit_token = np.empty(links, dtype=np.int64)
    logit_weight = np.empty(links, dtype=np.float64)
    logit_rows = np.empty(links, dtype=np.int64)
    if ok:
        u = 0
        for i in range(n):
            if kind[i] == _NEURON:
                unit_layer[u] = layer[i]
                unit_neuron[u] = index[i]
                unit_activation[u] = activation[i] if has_activation[i] else np.nan
                unit_attribution[u] = attribution[i] if has_attribution[i] else np.nan
                u += 1
        a = 0
        b = 0
        for j in range(e):
            s = src[j]
            t = tgt[j]
            if kind[s] != _NEURON:
                continue
            if kind[t] == _NEURON:
                src_layer[a] = layer[s]
                src_neuron[a] = index[s]
                tgt_layer[a] = layer[t]
                tgt_neuron[a] = index[t]
                edge_weight[a] = weight[j]
                a += 1
            elif kind[t] == _LOGIT:
                logit_layer[b] = layer[s]
                logit_neuron[b] = index[s]
                logit_token[b] = index[t]
                logit_weight[b] = weight[j]
                logit_rows[b] = t
                b += 1
    return (ok, unit_layer, unit_neuron, unit_activation, unit_attribution, src_layer, src_neuron, tgt_layer,
            tgt_neuron, edge_weight, logit_layer, logit_neuron, logit_token, logit_weight, logit_rows)  # fmt: skip
