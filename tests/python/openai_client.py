"""Drives kedge with the official `openai` client: the proxy must be invisible.

Usage: openai_client.py BASE_URL API_KEY MODEL
Prints one JSON line per check; exits non-zero on the first failure.
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=10)

msgs = [{"role": "user", "content": "hi"}]

# Non-streaming chat, with the response's usage.
chat = client.chat.completions.create(model=model, messages=msgs)
print(json.dumps({"check": "chat", "content": chat.choices[0].message.content,
                  "completion_tokens": chat.usage.completion_tokens}))

# Streaming without asking for usage: no usage chunk may appear.
chunks = list(client.chat.completions.create(model=model, messages=msgs, stream=True))
print(json.dumps({"check": "stream", "content": "".join(
    c.choices[0].delta.content or "" for c in chunks if c.choices),
    "usage_chunks": sum(1 for c in chunks if c.usage is not None)}))

# Streaming with usage: the last chunk carries it.
chunks = list(client.chat.completions.create(
    model=model, messages=msgs, stream=True, stream_options={"include_usage": True}))
print(json.dumps({"check": "stream_usage", "completion_tokens": chunks[-1].usage.completion_tokens}))

# Models, embeddings, and errors surfacing as the SDK's own exceptions.
print(json.dumps({"check": "models", "ids": [m.id for m in client.models.list()]}))
emb = client.embeddings.create(model=model, input="embed me")
print(json.dumps({"check": "embeddings", "dims": len(emb.data[0].embedding)}))
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    print(json.dumps({"check": "not_found", "raised": None}))
except openai.NotFoundError as e:
    print(json.dumps({"check": "not_found", "raised": "NotFoundError", "code": e.code}))
try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()
    print(json.dumps({"check": "bad_key", "raised": None}))
except openai.AuthenticationError as e:
    print(json.dumps({"check": "bad_key", "raised": "AuthenticationError", "code": e.code}))
