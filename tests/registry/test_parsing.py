"""Image references, blob URLs, credential matching and auth challenges (no network needed)."""

from __future__ import annotations

import base64
import json

import pytest
from overlaybd.registry.auth import AuthError, parse_challenge, parse_token_response, token_url
from overlaybd.registry.credentials import CredentialError, CredentialProvider, candidate_keys, match_auths
from overlaybd.registry.image_ref import ReferenceError, blob_url, parse_blob_url, parse_reference

DIG = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("busybox", "registry-1.docker.io", "library/busybox", "latest", ""),
        ("docker.io/library/redis:7", "registry-1.docker.io", "library/redis", "7", ""),
        ("user/app:v1", "registry-1.docker.io", "user/app", "v1", ""),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", ""),
        ("localhost/x", "localhost", "x", "latest", ""),
        (f"ghcr.io/o/r@{DIG}", "ghcr.io", "o/r", "", DIG),
        (f"reg.example.com:443/o/r:tag@{DIG}", "reg.example.com:443", "o/r", "tag", DIG),
    ],
)
def test_parse_reference(text, registry, repo, tag, digest):
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert r.reference == (digest or tag)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("", "reference"),
        ("Upper/Case", "repository"),
        ("a/b@sha256:short", "digest"),
        ("a/b:bad tag", "tag"),
        (" x", "reference"),
    ],
)
def test_bad_reference_names_part(text, part):
    with pytest.raises(ReferenceError) as ei:
        parse_reference(text)
    assert ei.value.part == part and repr(text) in str(ei.value)


def test_blob_url_and_location():
    assert blob_url("https://h/v2/a/b/blobs", DIG) == f"https://h/v2/a/b/blobs/{DIG}"
    assert blob_url("https://h/v2/a/b/blobs/", DIG) == f"https://h/v2/a/b/blobs/{DIG}"
    loc = parse_blob_url("http://127.0.0.1:5000/v2/ns/repo/blobs", DIG)
    assert (loc.scheme, loc.registry, loc.repository, loc.digest) == ("http", "127.0.0.1:5000", "ns/repo", DIG)
    with pytest.raises(ReferenceError, match="repoBlobUrl"):
        parse_blob_url("ftp://h/v2/a/blobs", DIG)
    with pytest.raises(ReferenceError, match="repoBlobUrl"):
        parse_blob_url("https://h/x/a/blobs", DIG)
    with pytest.raises(ReferenceError, match="digest"):
        parse_blob_url("https://h/v2/a/blobs", "nope")


def test_candidate_keys_and_first_match_wins():
    url = f"https://reg.io/v2/team/app/blobs/{DIG}"
    assert candidate_keys(url) == ["reg.io", "reg.io/team", "reg.io/team/app"]
    auths = {
        "reg.io/other": {"username": "o", "password": "o"},
        "reg.io/team": {"auth": base64.b64encode(b"t:pw:with:colons").decode()},
        "reg.io": {"username": "h", "password": "h"},
    }
    c = match_auths("cred.json", auths, url)
    assert (c.username, c.password) == ("t", "pw:with:colons")
    assert match_auths("cred.json", {"https://reg.io": {"username": "u", "password": "p"}}, url).username == "u"
    assert match_auths("cred.json", {"reg.io.evil": {"username": "u", "password": "p"}}, url) is None


def test_bad_credentials_file_names_field(tmp_path):
    p = tmp_path / "cred.json"
    prov = CredentialProvider("file", str(p))
    assert prov.lookup("https://reg.io/v2/a/blobs/x") is None  # missing file: anonymous
    p.write_text(json.dumps({"auths": {"reg.io": {"auth": "!!!notbase64"}}}))
    with pytest.raises(CredentialError) as ei:
        prov.lookup("https://reg.io/v2/a/blobs/x")
    assert ei.value.source == str(p) and ei.value.field == "auths.reg.io.auth"
    p.write_text("{not json")
    with pytest.raises(CredentialError, match="json"):
        prov.lookup("https://reg.io/v2/a/blobs/x")
    p.write_text(json.dumps({"auths": []}))
    with pytest.raises(CredentialError, match="auths"):
        prov.lookup("https://reg.io/v2/a/blobs/x")


def test_challenge_and_token_parsing():
    ch = parse_challenge('Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull"')
    assert ch.scheme == "bearer" and ch.params["service"] == "registry.io"
    assert token_url(ch, "a/b") == "https://auth.io/token?service=registry.io&scope=repository%3Aa%2Fb%3Apull"
    ch2 = parse_challenge('Bearer realm="https://auth.io/token?x=1"')
    assert token_url(ch2, "a/b") == "https://auth.io/token?x=1&scope=repository%3Aa%2Fb%3Apull"
    assert parse_challenge('Basic realm="r"').scheme == "basic"
    assert parse_challenge("") is None
    with pytest.raises(AuthError, match="realm"):
        token_url(parse_challenge("Bearer service=x"), "a")
    assert parse_token_response(b'{"access_token": "t", "expires_in": 600}') == ("t", 590.0)
    assert parse_token_response(b'{"token": "t", "expires_in": 5}')[1] == 5.0
    with pytest.raises(AuthError, match="no token"):
        parse_token_response(b"{}")
    with pytest.raises(AuthError, match="non-JSON"):
        parse_token_response(b"<html>")
