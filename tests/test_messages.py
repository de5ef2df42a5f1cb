"""Outbound message content: every type parses, every bad record says what to fix."""

from __future__ import annotations

import pytest

from wa_worker.messages import Content, ContentError, Kind, build_vcard, kind_for_mimetype, parse_content


def test_a_record_without_content_fields_is_text_as_in_the_first_contract():
    assert parse_content({"id": "m1", "to": "5511", "body": "hi"}) == Content(Kind.TEXT, body="hi")
    assert parse_content({"text": "hello"}).body == "hello"  # the "text" alias of body


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        ({"type": "image", "media_url": "https://x.example/a.jpg", "body": "cap"}, Kind.IMAGE),
        ({"type": "VIDEO", "media_url": "http://x.example/a.mp4"}, Kind.VIDEO),
        ({"type": "voice", "media_base64": "AAAA"}, Kind.VOICE),
        ({"type": "document", "media_url": "https://x.example/a.pdf", "filename": "a.pdf", "body": "see"},
         Kind.DOCUMENT),
        ({"type": "sticker", "media_base64": "UklGRg=="}, Kind.STICKER),
        ({"media_url": "https://x.example/a", "mimetype": "image/png"}, Kind.IMAGE),
        ({"media_url": "https://x.example/a", "mimetype": "audio/mpeg"}, Kind.AUDIO),
        ({"media_url": "https://x.example/a", "mimetype": "application/pdf"}, Kind.DOCUMENT),
        ({"media_url": "https://x.example/a"}, None),  # inferred after sniffing
        ({"latitude": -23.55, "longitude": "-46.63", "name": "Sé"}, Kind.LOCATION),
        ({"contact": {"name": "Ana", "phone": "+55 11 98888-7777"}}, Kind.CONTACT),
        ({"reaction": "👍", "reply_to": "3EB0ABC"}, Kind.REACTION),
        ({"type": "reaction", "reaction": "", "reply_to": "3EB0ABC"}, Kind.REACTION),
    ],
)
def test_every_type_parses(item, kind):
    assert parse_content(item).kind is kind


def test_fields_are_carried():
    c = parse_content({"type": "document", "media_url": " https://x.example/r.pdf ", "mimetype": "Application/PDF",
                       "filename": "../etc/passwd", "body": "the report", "reply_to": "3EB0FF"})
    assert c.media is not None and c.media.url == "https://x.example/r.pdf"
    assert c.media.mimetype == "application/pdf" and c.media.filename == ".._etc_passwd"
    assert (c.body, c.reply_to) == ("the report", "3EB0FF")
    loc = parse_content({"latitude": 1, "longitude": 2, "address": "Rua X"}).location
    assert loc is not None and (loc.latitude, loc.longitude, loc.name, loc.address) == (1.0, 2.0, None, "Rua X")
    card = parse_content({"contact": {"name": "Ana", "phone": "+55 11 98888-7777"}}).contact
    assert card is not None and "waid=5511988887777:+5511988887777" in card.vcard and card.name == "Ana"
    vcard = build_vcard("Bo", "551100")
    assert parse_content({"vcard": vcard}).contact.name == "Bo"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("item", "code", "words"),
    [
        ({"body": ""}, "invalid_message", "empty body"),
        ({"body": 5}, "invalid_message", "not text"),
        ({"type": "gif", "body": "x"}, "invalid_message", "unknown type"),
        ({"type": 3}, "invalid_message", "must be a string"),
        ({"type": "edit", "body": "x"}, "invalid_message", "unknown type"),
        ({"type": "image"}, "invalid_message", "exactly one of"),
        ({"type": "image", "media_url": "https://a", "media_base64": "AA"}, "invalid_message", "exactly one of"),
        ({"type": "image", "media_url": "file:///etc/passwd"}, "media_refused", "http:// or https://"),
        ({"type": "image", "media_url": "ftp://x/y"}, "media_refused", "http:// or https://"),
        ({"type": "image", "media_url": "https://a", "mimetype": "jpeg"}, "invalid_message", "media type"),
        ({"type": "voice", "media_url": "https://a", "body": "hello"}, "invalid_message", "cannot carry a caption"),
        ({"type": "location", "latitude": 91, "longitude": 0}, "invalid_message", "between -90 and 90"),
        ({"latitude": "NaN", "longitude": 0}, "invalid_message", "between"),
        ({"latitude": True, "longitude": 0}, "invalid_message", "must be a number"),
        ({"latitude": 1}, "invalid_message", "'longitude' must be a number"),
        ({"contact": {"name": "Ana"}}, "invalid_message", "needs 'contact'"),
        ({"contact": "Ana"}, "invalid_message", "must be an object"),
        ({"contact": {"name": "Ana", "phone": "call me"}}, "invalid_message", "not a phone number"),
        ({"vcard": "hello"}, "invalid_message", "not a vCard"),
        ({"reaction": "👍"}, "invalid_message", "needs 'reply_to'"),
        ({"type": "reaction", "reply_to": "3EB0"}, "invalid_message", "needs 'reaction'"),
        ({"reaction": "x" * 40, "reply_to": "3EB0"}, "invalid_message", "longer than"),
        ({"body": "hi", "reply_to": "bad id!"}, "invalid_message", "not a WhatsApp message id"),
        ({"type": "image", "media_url": "https://a/" + "x" * 5000}, "invalid_message", "longer than"),
    ],
)
def test_bad_records_say_what_to_fix(item, code, words):
    with pytest.raises(ContentError) as err:
        parse_content(item)
    assert err.value.code == code
    assert words in str(err.value)


def test_kind_for_mimetype():
    assert kind_for_mimetype("image/webp") is Kind.IMAGE
    assert kind_for_mimetype("video/mp4") is Kind.VIDEO
    assert kind_for_mimetype("audio/ogg; codecs=opus") is Kind.AUDIO
    assert kind_for_mimetype(None) is Kind.DOCUMENT
    assert kind_for_mimetype("text/plain") is Kind.DOCUMENT
