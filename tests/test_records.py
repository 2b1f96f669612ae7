"""The record parser: integrity first (checksum, sequence, end count), then decoding."""

import pytest

from lab.records import RecordError, checksum, parse_line, parse_stream, to_observation, unescape


def line(seq: int, body: str) -> bytes:
    text = f"@@LAB {seq} {body}".encode()
    return text + f" ck={checksum(text):02x}\r\n".encode()


def stream(*bodies: str, end: bool = True) -> bytes:
    out = b"".join(line(i, b) for i, b in enumerate(bodies))
    if end:
        out += line(len(bodies), f"end count={len(bodies)}")
    return out


def test_observation_params_before_obs_details_after():
    rec = parse_line(line(4, "obs scope=host probe=rdtsc tsd=1 cpl=3 obs=#GP(0) rip=0x1000"))
    o = to_observation(rec)
    assert (o.seq, o.scope, o.probe) == (4, "host", "rdtsc")
    assert o.params == {"tsd": "1", "cpl": "3"}
    assert o.value == "#GP(0)"
    assert o.details == {"rip": "0x1000"}


def test_escaped_signature_keeps_nul_bytes():
    o = to_observation(parse_line(line(0, r"obs scope=host probe=cpuid-hv-signature obs=KVMKVMKVM\x00\x00\x00")))
    assert o.value == "KVMKVMKVM\0\0\0"
    assert len(o.value) == 12


def test_unescape_rejects_broken_escape():
    with pytest.raises(RecordError):
        unescape(rb"abc\x4")
    with pytest.raises(RecordError):
        unescape(rb"abc\q00")


def test_checksum_mismatch_is_rejected():
    good = line(0, "info a=1")
    bad = good.replace(b"a=1", b"a=2")
    with pytest.raises(RecordError, match="checksum"):
        parse_line(bad)


def test_complete_stream():
    t = parse_stream(b"SeaBIOS noise\r\n" + stream("hello proto=1", "obs scope=host probe=cpuid-hv-bit obs=1"))
    assert t.complete and not t.problems
    assert [o.probe for o in t.observations] == ["cpuid-hv-bit"]


def test_cut_short_stream_is_incomplete():
    t = parse_stream(stream("hello proto=1", "info x=1", end=False))
    assert not t.complete
    assert any("cut short" in p for p in t.problems)


def test_sequence_gap_is_a_problem():
    data = line(0, "hello proto=1") + line(2, "info x=1") + line(3, "end count=3")
    t = parse_stream(data)
    assert any("sequence gap" in p for p in t.problems)


def test_end_count_must_match():
    data = line(0, "hello proto=1") + line(1, "end count=7")
    t = parse_stream(data)
    assert not t.complete


def test_garbage_and_binary_noise_do_not_confuse_the_parser():
    noise = bytes(range(256)) + b"\x1b[2J@@LA" + b"x" * 5000 + b"\r\n"
    t = parse_stream(noise + stream("hello proto=1"))
    assert t.complete and not t.problems


def test_record_after_noise_on_same_line_is_still_checked():
    data = b"\x00\xffjunk" + stream("hello proto=1")
    assert parse_stream(data).complete


def test_empty_stream():
    t = parse_stream(b"")
    assert not t.complete and "no record received" in t.problems


def test_obs_without_obs_key_is_a_problem():
    t = parse_stream(stream("hello proto=1", "obs scope=host probe=rdtsc tsd=1"))
    assert any("well-formed" in p for p in t.problems)
