"""Properties of protocol/session.py: preamble, IK handshake, records.

Two Session objects are joined by hand, as h11's ConnectionPair joins two
connections: `Link` carries each side's bytes to the other, and every test
that plays the man in the middle edits those bytes in flight.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.protocol import noise
from dorothy.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dorothy.protocol.framing import HEADER_LEN, MAX_HANDSHAKE_FRAME, encode_frame
from dorothy.protocol.session import (
    HANDSHAKE1_LEN,
    HANDSHAKE2_LEN,
    MAGIC,
    MAX_RECORD_PLAINTEXT,
    SUPPORTED_VERSIONS,
    TAG_LEN,
    Authenticated,
    Closed,
    Message,
    RecordCipher,
    Session,
    encode_preamble,
)

FAST = settings(max_examples=50, deadline=None)
FEW = settings(max_examples=15, deadline=None)


# -- the link ---------------------------------------------------------------


def keypair() -> tuple[bytes, bytes]:
    private = os.urandom(32)
    return private, noise.x25519_public(private)


def drain(session: Session) -> list:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


@dataclass
class Link:
    """An initiator and a responder, joined by hand; `asked` records every
    key the responder's authorize callback was shown."""

    initiator: Session
    responder: Session
    i_public: bytes
    r_public: bytes
    r_private: bytes
    asked: list = field(default_factory=list)  # keys the responder was asked about

    def handshake(self) -> tuple[bytes, bytes]:
        """Preamble + message 1 over, message 2 back; returns both as sent."""
        opening = self.initiator.initiate()
        self.responder.receive_data(opening)
        assert drain(self.responder) == []  # nobody is proven yet
        reply = self.responder.data_to_send()
        self.initiator.receive_data(reply)
        return opening, reply

    def establish(self, first: bytes = b"hello") -> tuple[bytes, bytes, bytes]:
        """The handshake, then the initiator's key confirmation and a first
        message (returned together as `confirm`)."""
        opening, reply = self.handshake()
        assert drain(self.initiator) == [Authenticated(peer_static=self.r_public, version=1)]
        confirm = self.initiator.data_to_send() + self.initiator.send_message(first)
        self.responder.receive_data(confirm)
        assert drain(self.responder) == [
            Authenticated(peer_static=self.i_public, version=1),
            Message(data=first),
        ]
        return opening, reply, confirm


def make_link(
    *,
    trusted: bool = True,
    pinned: bytes | None = None,
    i_versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    r_versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    i_rekey: int | None = None,
    r_rekey: int | None = None,
    responder_static: tuple[bytes, bytes] | None = None,
) -> Link:
    i_private, i_public = keypair()
    r_private, r_public = responder_static or keypair()
    asked: list[bytes] = []

    def authorize(key: bytes) -> bool:
        asked.append(key)
        return trusted

    extra_i = {} if i_rekey is None else {"rekey_interval": i_rekey}
    extra_r = {} if r_rekey is None else {"rekey_interval": r_rekey}
    initiator = Session(
        initiator=True,
        static_private=i_private,
        ephemeral_private=os.urandom(32),
        remote_static=pinned or r_public,
        versions=i_versions,
        **extra_i,
    )
    responder = Session(
        initiator=False,
        static_private=r_private,
        ephemeral_private=os.urandom(32),
        authorize=authorize,
        versions=r_versions,
        **extra_r,
    )
    return Link(initiator, responder, i_public, r_public, r_private, asked)


def new_responder(link: Link) -> tuple[Session, list]:
    """A fresh responder holding the same static key as `link.responder`."""
    asked: list[bytes] = []
    responder = Session(
        initiator=False,
        static_private=link.r_private,
        ephemeral_private=os.urandom(32),
        authorize=lambda key: asked.append(key) or True,
    )
    return responder, asked


@st.composite
def split(draw, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points; never an empty piece (b"" means EOF)."""
    if len(data) < 2:
        return [data] if data else []
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=6))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_until_error(session: Session, pieces: list[bytes]) -> tuple[list, ProtocolError | None]:
    """Feed pieces then EOF; (every event produced, the error that stopped it)."""
    events = []
    try:
        for piece in [*pieces, b""]:
            session.receive_data(piece)
            events += drain(session)
    except ProtocolError as exc:
        events += drain(session)
        return events, exc
    return events, None


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def payload_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def authenticated_or_message(events: list) -> list:
    return [e for e in events if isinstance(e, (Authenticated, Message))]


# -- the handshake ----------------------------------------------------------


@FAST
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=12))
def test_handshake_completes_and_messages_flow_both_ways(traffic):
    link = make_link()
    opening, reply = link.handshake()
    assert len(opening) == len(encode_preamble(SUPPORTED_VERSIONS)) + HEADER_LEN + HANDSHAKE1_LEN
    assert len(reply) == HEADER_LEN + HANDSHAKE2_LEN
    assert drain(link.initiator) == [Authenticated(peer_static=link.r_public, version=1)]
    # The responder has decided whom it is talking to, but says nothing
    # until the initiator proves it holds the ephemeral key too.
    assert link.asked == [link.i_public]
    with pytest.raises(LocalProtocolError):
        link.responder.send_message(b"too early")
    confirm = link.initiator.data_to_send()
    link.responder.receive_data(confirm)
    assert drain(link.responder) == [Authenticated(peer_static=link.i_public, version=1)]
    link.responder.receive_data(link.initiator.send_message(b"first"))
    assert drain(link.responder) == [Message(data=b"first")]
    assert link.initiator.peer_static == link.r_public and link.responder.peer_static == link.i_public
    assert link.initiator.version == link.responder.version == 1
    for from_initiator, payload in traffic:
        sender, receiver = (link.initiator, link.responder) if from_initiator else (link.responder, link.initiator)
        receiver.receive_data(sender.send_message(payload))
        assert drain(receiver) == [Message(data=payload)]


def test_first_record_must_be_the_key_confirmation():
    # Until it arrives the responder keeps frames at the handshake size, so
    # a replayed message 1 cannot make it buffer a full-size record.
    link = make_link()
    link.handshake()
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(link.initiator.send_message(b"data before confirmation"))
    assert info.value.code == "decrypt_failed"  # the confirmation held nonce 0
    assert drain(link.responder) == []


def test_close_right_after_confirmation():
    link = make_link()
    link.handshake()
    link.responder.receive_data(link.initiator.data_to_send() + link.initiator.close("nothing to say"))
    assert drain(link.responder) == [
        Authenticated(peer_static=link.i_public, version=1),
        Closed(reason="nothing to say"),
    ]


def test_misuse_is_refused_locally():
    private, public = keypair()
    with pytest.raises(LocalProtocolError):
        Session(initiator=True, static_private=private, ephemeral_private=os.urandom(32))
    with pytest.raises(LocalProtocolError):
        Session(initiator=False, static_private=private, ephemeral_private=os.urandom(32))
    link = make_link()
    with pytest.raises(LocalProtocolError):
        link.responder.initiate()
    with pytest.raises(LocalProtocolError):
        link.initiator.send_message(b"before the handshake")
    with pytest.raises(LocalProtocolError):
        link.initiator.close()
    link.initiator.initiate()
    with pytest.raises(LocalProtocolError):
        link.initiator.initiate()


def test_initiate_is_refused_after_the_handshake_completes():
    # initiate() is "called once": a second call after the handshake would
    # put a cleartext preamble and a repeated message 1 (same ephemeral key)
    # into the middle of the encrypted stream.
    link = make_link()
    link.establish()
    with pytest.raises(LocalProtocolError):
        link.initiator.initiate()


# -- garbage before authentication ------------------------------------------


@st.composite
def responder_garbage(draw):
    """Bytes an unauthenticated peer might send a responder, each kind
    reaching a little deeper: raw noise, a preamble, a handshake-sized
    frame, or a genuine opening (flipped or not) followed by forged records."""
    kind = draw(st.sampled_from(["raw", "preamble", "message1-sized", "genuine", "flipped"]))
    tail = draw(st.binary(max_size=120))
    if kind == "raw":
        return None, draw(st.one_of(st.binary(max_size=200), st.binary(max_size=20).map(lambda b: MAGIC + b)))
    if kind == "preamble":
        versions = tuple(draw(st.lists(st.integers(0, 255), min_size=0, max_size=10)))
        return None, MAGIC + bytes([len(versions)]) + bytes(versions) + tail
    if kind == "message1-sized":
        body = draw(st.binary(min_size=HANDSHAKE1_LEN, max_size=HANDSHAKE1_LEN))
        return None, encode_preamble((1,)) + encode_frame(body) + tail
    records = draw(st.lists(st.binary(min_size=TAG_LEN + 1, max_size=80).map(encode_frame), max_size=3))
    return kind, b"".join(records) + tail


@FAST
@given(responder_garbage(), st.data())
def test_garbage_never_authenticates_a_responder(garbage, data):
    kind, stream = garbage
    link = make_link()
    if kind is not None:
        opening = link.initiator.initiate()
        if kind == "flipped":
            opening = flip(opening, data.draw(st.integers(0, len(opening) * 8 - 1), label="bit"))
        stream = opening + stream
    events, error = feed_until_error(link.responder, data.draw(split(stream), label="pieces"))
    assert authenticated_or_message(events) == []
    # Never authenticated, never closed: it must end in the protocol's own error.
    assert isinstance(error, (LocalProtocolError, RemoteProtocolError))
    with pytest.raises(LocalProtocolError):
        link.responder.receive_data(b"more")


@st.composite
def initiator_garbage(draw):
    kind = draw(st.sampled_from(["raw", "message2-sized", "flipped-reply", "foreign-reply"]))
    tail = draw(st.binary(max_size=120))
    if kind == "raw":
        return kind, draw(st.binary(max_size=200))
    if kind == "message2-sized":
        return kind, encode_frame(draw(st.binary(min_size=HANDSHAKE2_LEN, max_size=HANDSHAKE2_LEN))) + tail
    return kind, tail


@FAST
@given(initiator_garbage(), st.data())
def test_garbage_never_authenticates_an_initiator(garbage, data):
    kind, stream = garbage
    link = make_link()
    opening = link.initiator.initiate()
    if kind == "flipped-reply":
        link.responder.receive_data(opening)
        reply = link.responder.data_to_send()
        stream = flip(reply, data.draw(st.integers(0, len(reply) * 8 - 1), label="bit")) + stream
    elif kind == "foreign-reply":
        # A genuine message 2 from the same responder, but answering another
        # initiation (as a replayer who recorded an earlier session has).
        other = make_link(responder_static=(link.r_private, link.r_public))
        other.responder.receive_data(other.initiator.initiate())
        stream = other.responder.data_to_send() + stream
    events, error = feed_until_error(link.initiator, data.draw(split(stream), label="pieces"))
    assert authenticated_or_message(events) == []
    assert isinstance(error, (LocalProtocolError, RemoteProtocolError))


def test_initiator_fed_before_initiate_fails_with_a_protocol_error():
    link = make_link()
    with pytest.raises(ProtocolError):
        link.initiator.receive_data(encode_frame(bytes(HANDSHAKE2_LEN)))


# -- who may connect --------------------------------------------------------


def test_unknown_initiator_is_refused_before_any_reply():
    link = make_link(trusted=False)
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(link.initiator.initiate())
    assert info.value.code == "unknown_peer"
    assert link.asked == [link.i_public]
    assert link.responder.data_to_send() == b""  # no message 2: nothing for a prober
    assert drain(link.responder) == []
    with pytest.raises(LocalProtocolError):
        link.responder.receive_data(b"\x00")


def test_initiator_pinning_another_key_is_refused_by_the_responder():
    _, other_public = keypair()
    link = make_link(pinned=other_public)
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(link.initiator.initiate())
    assert info.value.code == "decrypt_failed"
    assert link.asked == []  # it never even learned who was calling
    assert link.responder.data_to_send() == b""
    assert drain(link.responder) == []


@FEW
@given(st.lists(st.binary(max_size=50), max_size=4), st.data())
def test_replayed_opening_never_reaches_the_application(later, data):
    link = make_link()
    opening, _, confirm = link.establish(b"the real first record")
    recorded = [link.initiator.send_message(p) for p in later]
    replay_all = data.draw(st.booleans(), label="replay the later records too")
    victim, asked = new_responder(link)
    victim.receive_data(opening)
    # IK message 1 is replayable: the victim may well answer it...
    assert asked == [link.i_public]
    assert len(victim.data_to_send()) == HEADER_LEN + HANDSHAKE2_LEN
    assert drain(victim) == []
    # ...but the replayer lacks the ephemeral key behind message 1, so the
    # recorded key confirmation does not open under the victim's new keys.
    stream = confirm + (b"".join(recorded) if replay_all else b"")
    events, error = feed_until_error(victim, data.draw(split(stream), label="pieces"))
    assert authenticated_or_message(events) == []
    assert isinstance(error, RemoteProtocolError) and error.code == "decrypt_failed"


# -- versions and the preamble ----------------------------------------------


def test_both_ends_agree_on_the_highest_common_version():
    for i_versions, r_versions, expected in [((1, 2), (1, 2), 2), ((1, 2), (1,), 1), ((1,), (1, 2), 1), ((2, 1), (1, 2), 2)]:
        link = make_link(i_versions=i_versions, r_versions=r_versions)
        link.handshake()
        assert drain(link.initiator) == [Authenticated(peer_static=link.r_public, version=expected)]
        link.responder.receive_data(link.initiator.data_to_send())
        assert drain(link.responder) == [Authenticated(peer_static=link.i_public, version=expected)]


def test_stripping_a_version_in_flight_breaks_the_handshake():
    link = make_link(i_versions=(1, 2), r_versions=(1, 2))
    opening = link.initiator.initiate()
    honest = encode_preamble((1, 2))
    assert opening.startswith(honest)
    downgraded = encode_preamble((1,)) + opening[len(honest) :]
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(downgraded)
    assert info.value.code == "decrypt_failed"  # the prologue no longer matches
    assert link.responder.data_to_send() == b""
    assert drain(link.responder) == []


@FAST
@given(st.lists(st.integers(0, 255), min_size=1, max_size=8))
def test_any_rewrite_of_the_offered_versions_breaks_the_handshake(rewritten):
    rewritten = tuple(rewritten)
    offered = (1, 2)
    if rewritten == offered:
        rewritten = (2, 1)  # even reordering changes the prologue
    link = make_link(i_versions=offered, r_versions=(1, 2, 3))
    opening = link.initiator.initiate()
    tampered = encode_preamble(rewritten) + opening[len(encode_preamble(offered)) :]
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(tampered)
    assert info.value.code in ("decrypt_failed", "version_mismatch")
    assert link.responder.data_to_send() == b""


def test_no_common_version_is_refused():
    link = make_link(i_versions=(2, 3), r_versions=(1,))
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(link.initiator.initiate())
    assert info.value.code == "version_mismatch"
    assert link.responder.data_to_send() == b""


@FAST
@given(st.integers(0, len(MAGIC) - 1), st.integers(0, 255))
def test_bad_magic_is_refused_at_the_first_wrong_byte(position, wrong):
    if wrong == MAGIC[position]:
        wrong ^= 0x80
    link = make_link()
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(MAGIC[:position] + bytes([wrong]))
    assert info.value.code == "bad_magic"


def test_full_bad_magic_is_refused():
    link = make_link()
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(b"HTTP/1.1 200 OK\r\n")
    assert info.value.code == "bad_magic"


@pytest.mark.parametrize("count", [0, 9, 255])
def test_version_count_out_of_bounds_is_refused(count):
    link = make_link()
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(MAGIC + bytes([count]))
    assert info.value.code == "bad_preamble"


# -- records after the handshake --------------------------------------------


def record_stream(link: Link, from_initiator: bool, payloads: list[bytes]) -> tuple[Session, list[bytes]]:
    """(receiver, records): one record per payload, then the close."""
    sender, receiver = (link.initiator, link.responder) if from_initiator else (link.responder, link.initiator)
    return receiver, [sender.send_message(p) for p in payloads] + [sender.close("bye")]


def messages(events: list) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Message)]


payload_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=5)


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_untouched_stream_delivers_everything_then_closes(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    events, error = feed_until_error(receiver, data.draw(split(b"".join(records)), label="pieces"))
    assert error is None
    assert events == [Message(data=p) for p in payloads] + [Closed(reason="bye")]


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_flipping_any_bit_of_any_record_body_is_detected(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    k = data.draw(st.integers(0, len(records) - 1), label="record")
    bit = data.draw(st.integers(HEADER_LEN * 8, len(records[k]) * 8 - 1), label="bit")
    records[k] = flip(records[k], bit)
    events, error = feed_until_error(receiver, data.draw(split(b"".join(records)), label="pieces"))
    assert isinstance(error, RemoteProtocolError) and error.code == "decrypt_failed"
    assert messages(events) == payloads[:k]
    assert not any(isinstance(e, Closed) for e in events)


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_flipping_a_bit_of_a_record_length_is_detected_by_eof(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    k = data.draw(st.integers(0, len(records) - 1), label="record")
    records[k] = flip(records[k], data.draw(st.integers(0, HEADER_LEN * 8 - 1), label="bit"))
    events, error = feed_until_error(receiver, data.draw(split(b"".join(records)), label="pieces"))
    assert isinstance(error, RemoteProtocolError)
    assert messages(events) == payloads[: len(messages(events))]
    assert len(messages(events)) <= k
    assert not any(isinstance(e, Closed) for e in events)


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_dropping_any_record_is_detected(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    k = data.draw(st.integers(0, len(records) - 1), label="dropped")
    del records[k]
    events, error = feed_until_error(receiver, records)
    assert isinstance(error, RemoteProtocolError)
    # Dropping the close leaves a stream that just stops: truncation.
    assert error.code == ("truncated" if k == len(payloads) else "decrypt_failed")
    assert messages(events) == payloads[:k]


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_duplicating_any_record_is_detected(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    k = data.draw(st.integers(0, len(payloads) - 1), label="duplicated")
    records.insert(k + 1, records[k])
    events, error = feed_until_error(receiver, records)
    assert isinstance(error, RemoteProtocolError) and error.code == "decrypt_failed"
    assert messages(events) == payloads[: k + 1]


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_swapping_any_two_records_is_detected(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    i = data.draw(st.integers(0, len(records) - 2), label="first")
    j = data.draw(st.integers(i + 1, len(records) - 1), label="second")
    records[i], records[j] = records[j], records[i]
    events, error = feed_until_error(receiver, records)
    assert isinstance(error, RemoteProtocolError) and error.code == "decrypt_failed"
    assert messages(events) == payloads[:i]


@FAST
@given(st.integers(0, 2), st.data())
def test_tampered_key_confirmation_authenticates_nobody(which, data):
    link = make_link()
    link.handshake()
    confirm = link.initiator.send_message(b"confirm")
    if which == 0:
        stream = flip(confirm, data.draw(st.integers(0, len(confirm) * 8 - 1), label="bit"))
    elif which == 1:
        stream = link.initiator.send_message(b"second")  # the first one dropped
    else:
        stream = confirm[:-1]
    events, error = feed_until_error(link.responder, [stream])
    assert authenticated_or_message(events) == []
    assert isinstance(error, RemoteProtocolError)


# -- truncation and close ---------------------------------------------------


@FAST
@given(st.booleans(), payload_lists, st.data())
def test_eof_anywhere_before_the_close_is_truncation(from_initiator, payloads, data):
    link = make_link()
    link.establish()
    receiver, records = record_stream(link, from_initiator, payloads)
    stream = b"".join(records)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    events, error = feed_until_error(receiver, [stream[:cut]] if cut else [])
    assert isinstance(error, RemoteProtocolError) and error.code == "truncated"
    assert messages(events) == payloads[: len(messages(events))]
    assert not any(isinstance(e, Closed) for e in events)


@pytest.mark.parametrize("stage", ["nothing", "partial preamble", "opening", "await confirm"])
def test_eof_during_the_handshake_is_truncation(stage):
    link = make_link()
    opening = link.initiator.initiate()
    fed = {"nothing": b"", "partial preamble": opening[:3], "opening": opening[:-1]}.get(stage, opening)
    if fed:
        link.responder.receive_data(fed)
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(b"")
    assert info.value.code == "truncated"
    with pytest.raises(RemoteProtocolError) as info:
        link.initiator.receive_data(b"")
    assert info.value.code == "truncated"


@pytest.mark.parametrize("from_initiator", [True, False])
def test_authenticated_close_then_eof_is_clean(from_initiator):
    link = make_link()
    link.establish()
    sender, receiver = (link.initiator, link.responder) if from_initiator else (link.responder, link.initiator)
    receiver.receive_data(sender.send_message(b"last words"))
    receiver.receive_data(sender.close("transfer complete"))
    receiver.receive_data(b"")  # no truncation error
    assert drain(receiver) == [Message(data=b"last words"), Closed(reason="transfer complete")]
    with pytest.raises(LocalProtocolError):
        sender.send_message(b"after close")
    with pytest.raises(LocalProtocolError):
        sender.close()


# -- sizes ------------------------------------------------------------------


@FEW
@given(st.booleans(), st.integers(0, 400_000), st.integers(0, 2**32), st.data())
def test_large_payloads_round_trip(from_initiator, size, seed, data):
    link = make_link()
    link.establish()
    sender, receiver = (link.initiator, link.responder) if from_initiator else (link.responder, link.initiator)
    payload = payload_of(size, seed)
    record = sender.send_message(payload)
    assert len(record) == HEADER_LEN + 1 + size + TAG_LEN
    for piece in data.draw(split(record), label="pieces"):
        receiver.receive_data(piece)
    assert drain(receiver) == [Message(data=payload)]


def test_largest_record_round_trips_and_one_byte_more_is_refused():
    link = make_link()
    link.establish()
    payload = payload_of(MAX_RECORD_PLAINTEXT, 7)
    with pytest.raises(LocalProtocolError):
        link.initiator.send_message(payload + b"!")
    # The refused message consumed no nonce: the next records still open.
    link.responder.receive_data(link.initiator.send_message(payload))
    link.responder.receive_data(link.initiator.send_message(b"after"))
    assert drain(link.responder) == [Message(data=payload), Message(data=b"after")]


def test_before_the_handshake_frames_are_held_to_the_handshake_limit():
    # The largest record needs a big frame, but a peer that has not yet sent
    # a valid message 1 (or 2) gets no more than a Noise message can need.
    assert HEADER_LEN + 1 + MAX_RECORD_PLAINTEXT + TAG_LEN > MAX_HANDSHAKE_FRAME
    oversized = (MAX_HANDSHAKE_FRAME + 1).to_bytes(HEADER_LEN, "big")
    link = make_link()
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(encode_preamble((1,)) + oversized)
    assert info.value.code == "frame_too_large"
    link.initiator.initiate()
    with pytest.raises(RemoteProtocolError) as info:
        link.initiator.receive_data(oversized)
    assert info.value.code == "frame_too_large"


# -- rekeying ---------------------------------------------------------------


def test_rekeyed_sessions_keep_talking():
    link = make_link(i_rekey=3, r_rekey=3)
    link.establish()
    for n in range(20):
        for sender, receiver in ((link.initiator, link.responder), (link.responder, link.initiator)):
            payload = f"message {n}".encode()
            receiver.receive_data(sender.send_message(payload))
            assert drain(receiver) == [Message(data=payload)]


def test_sessions_that_disagree_on_the_rekey_point_fail_exactly_there():
    # Proves the session really rekeys after `rekey_interval` records.
    link = make_link(i_rekey=3, r_rekey=1 << 16)
    link.establish(b"record 1")  # record 0 is the key confirmation
    link.responder.receive_data(link.initiator.send_message(b"record 2"))
    assert messages(drain(link.responder)) == [b"record 2"]
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(link.initiator.send_message(b"record 3"))
    assert info.value.code == "decrypt_failed"


def seal(cipher: RecordCipher, plaintext: bytes) -> bytes:
    """The sealed record, without its frame header."""
    return bytes(cipher.seal_frame(plaintext)[HEADER_LEN:])


@FAST
@given(st.binary(min_size=32, max_size=32), st.integers(0, 3), st.binary(max_size=3000))
def test_record_cipher_matches_libsodium_through_pynacl(key, position, plaintext):
    # The record cipher calls libsodium's raw binding for speed; its output
    # must be exactly what pynacl's public AEGIS-256 function gives.
    sender, receiver = RecordCipher(key), RecordCipher(key)
    for _ in range(position):
        receiver.open(seal(sender, b"earlier"))
    nonce = position.to_bytes(8, "little") + bytes(24)
    frame = sender.seal_frame(plaintext)
    expected = nacl.bindings.crypto_aead_aegis256_encrypt(plaintext, None, nonce, key)
    assert bytes(frame) == len(expected).to_bytes(HEADER_LEN, "big") + expected
    assert receiver.open(memoryview(frame)[HEADER_LEN:]) == plaintext


@FAST
@given(st.binary(min_size=32, max_size=32), st.integers(1, 5), st.binary(max_size=32))
def test_record_cipher_changes_key_at_the_interval(key, interval, plaintext):
    rekeying, steady = RecordCipher(key, interval), RecordCipher(key, 1 << 30)
    for _ in range(interval):
        assert seal(rekeying, plaintext) == seal(steady, plaintext)
    after_rekey = seal(rekeying, plaintext)
    same_nonce_old_key = seal(steady, plaintext)
    assert after_rekey != same_nonce_old_key
    # A receiver that has rekeyed cannot open what the old key sealed at the
    # same position, and vice versa.
    for sealed, opener_interval in ((same_nonce_old_key, interval), (after_rekey, 1 << 30)):
        opener = advanced(key, opener_interval, interval, plaintext)
        with pytest.raises(RemoteProtocolError) as info:
            opener.open(sealed)
        assert info.value.code == "decrypt_failed"


def advanced(key: bytes, interval: int, count: int, plaintext: bytes) -> RecordCipher:
    """A receiving RecordCipher that has opened `count` records."""
    sender, receiver = RecordCipher(key, interval), RecordCipher(key, interval)
    for _ in range(count):
        assert receiver.open(seal(sender, plaintext)) == plaintext
    return receiver


def test_record_sealed_before_a_rekey_does_not_open_after_it():
    link = make_link(i_rekey=3, r_rekey=3)
    link.establish(b"record 0")
    before = [link.initiator.send_message(f"record {n}".encode()) for n in (1, 2)]
    for record in before:
        link.responder.receive_data(record)
    assert messages(drain(link.responder)) == [b"record 1", b"record 2"]
    # Both ends have now rekeyed; the last pre-rekey record is replayed.
    with pytest.raises(RemoteProtocolError) as info:
        link.responder.receive_data(before[-1])
    assert info.value.code == "decrypt_failed"
