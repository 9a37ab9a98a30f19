"""Constrained output: `response_format` json_object and json_schema. Whatever the
sampling, an answer that ends by itself parses and validates against the schema; a
schema brise cannot enforce is a 400 naming it, never a silent fallback."""

from __future__ import annotations

import json

import openai
import pytest
from mistralai.client import models as mmodels

from conftest import MODEL, user

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "mood": {"enum": ["calm", "stormy"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}]},
    },
    "required": ["name", "age", "mood", "tags"],
}


def check_person(v) -> None:
    """A hand-written validator for PERSON (no jsonschema package needed)."""
    assert isinstance(v, dict), v
    assert set(v) <= set(PERSON["properties"]), v
    assert set(PERSON["required"]) <= set(v), v
    assert isinstance(v["name"], str) and len(v["name"]) <= 20, v
    assert isinstance(v["age"], int) and not isinstance(v["age"], bool), v
    assert v["mood"] in ("calm", "stormy"), v
    assert isinstance(v["tags"], list) and 1 <= len(v["tags"]) <= 3, v
    assert all(isinstance(t, str) for t in v["tags"]), v
    if "pet" in v and v["pet"] is not None:
        assert isinstance(v["pet"], dict) and isinstance(v["pet"].get("kind"), str), v
        assert set(v["pet"]) == {"kind"}, v


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.3, 3)])
def test_json_schema_validates(oai, temperature, seed):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=user("Write a haiku about autumn."),  # a prompt that does not ask for JSON
        temperature=temperature,
        seed=seed,
        max_tokens=160,
        response_format=schema_format(PERSON),
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", f"ran out of tokens: {c.message.content!r}"
    check_person(json.loads(c.message.content))


def test_json_object(oai):
    for seed in (5, 6):
        r = oai.chat.completions.create(
            model=MODEL, messages=user("List two colors."), temperature=1.0, seed=seed,
            max_tokens=120, response_format={"type": "json_object"},
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(json.loads(c.message.content), dict)


def test_json_streams_the_same_text(oai):
    kw = dict(model=MODEL, messages=user("Describe a person."), temperature=0, max_tokens=120,
              response_format=schema_format(PERSON))
    whole = oai.chat.completions.create(**kw).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(parts) == whole
    check_person(json.loads(whole))


@pytest.mark.parametrize(
    "schema,word",
    [
        ({"type": "string", "pattern": "^a+$"}, "pattern"),
        ({"type": "string", "format": "date-time"}, "format"),
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}, "minProperties"),
        ({"allOf": [{"type": "string"}]}, "allOf"),
        # Issue 21: out-of-range bounds were silently ignored, and enums had no limit.
        ({"type": "array", "maxItems": -1}, "maxItems must be a non-negative integer"),
        ({"type": "array", "minItems": 1e12}, "minItems must be a non-negative integer"),
        ({"enum": [f"v{i}" for i in range(20_000)]}, "more than 20000 nodes"),
        ({"enum": ["x" * 1000 + str(i) for i in range(300)]}, "more than 262144 bytes"),
    ],
)
def test_unenforceable_schema_is_400(oai, schema, word):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4,
                                    response_format=schema_format(schema))
    assert e.value.param == "response_format.json_schema.schema"
    assert word in e.value.message


def test_big_enum_answers_quickly_beside_a_plain_request(oai):
    """Issue 21: an enum of 2,000 values used to make a request beside it take 14 s (each
    vocabulary token was checked against every value at every step)."""
    import concurrent.futures as cf
    import time

    values = [f"city number {i}" for i in range(2000)]
    t = time.monotonic()
    with cf.ThreadPoolExecutor(2) as ex:
        big = ex.submit(oai.chat.completions.create, model=MODEL, messages=user("Pick a city."),
                        temperature=0, max_tokens=16,
                        response_format=schema_format({"enum": values}))
        plain = ex.submit(oai.chat.completions.create, model=MODEL, messages=user("Hi"),
                          temperature=0, max_tokens=4)
        assert plain.result().usage.completion_tokens == 4
        c = big.result().choices[0]
    assert c.finish_reason == "stop" and json.loads(c.message.content) in values
    assert time.monotonic() - t < 10


def test_unknown_response_format_type_is_400(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4,
                                    response_format={"type": "yaml"})
    assert e.value.param == "response_format.type"


def test_mistral_json_object(mistral):
    r = mistral.chat.complete(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        temperature=0,
        max_tokens=200,
        response_format=mmodels.ResponseFormat(type="json_object"),
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    assert isinstance(json.loads(c.message.content), dict)


def test_min_tokens_never_breaks_the_json(oai):
    """min_tokens holds back the end, but not past a complete value: the output stays valid."""
    r = oai.chat.completions.create(model=MODEL, messages=user("Give me an empty JSON object."), temperature=0,
                                    max_tokens=60, extra_body={"min_tokens": 50},
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "e", "schema": {"type": "object", "properties": {}}}})
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    assert json.loads(c.message.content) == {}
