"""
The one conversation validator (nanochat/conversation.py) and the three places that take conversations:
the tokenizer renders them, the tasks load them from data files, the web server reads them from requests.
The same bad conversation is refused by all three for the same reason (the server names the message as
its clients do, messages[i]); the two deliberate differences (strict data files, a reply needs the user's
turn last) are pinned down.
"""
import json
import re

import pytest

import tasks.common
from nanochat.conversation import ConversationError, content_text, validate_conversation
from nanochat.serve import RequestError, ServeConfig, parse_request

U, A, S = "user", "assistant", "system"


def conv(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def server(messages):
    """The server's reading of a request with these messages: the ChatRequest, or the RequestError."""
    try:
        return parse_request(json.dumps({"messages": messages}).encode(), ServeConfig())
    except RequestError as e:
        return e


# (messages, the validator's reason, the message at fault): each breaks the order of roles
ORDER = [
    (conv((A, "hi"), (U, "a")), "has role 'assistant', expected 'user'", 0),
    (conv((U, "a"), (U, "b")), "has role 'user', expected 'assistant'", 1),
    (conv((U, "a"), (S, "b"), (U, "c")), "has role 'system', expected 'assistant'", 1),
    (conv((S, "a"), (S, "b"), (U, "c")), "has role 'system', expected 'user'", 1),
    (conv((U, "a"), (A, "b"), (A, "c"), (U, "d")), "has role 'assistant', expected 'user'", 2),
]


def test_tasks_use_the_library_validator():
    assert tasks.common.validate_conversation is validate_conversation
    assert tasks.common.content_text is content_text


@pytest.mark.parametrize("messages, reason, index", ORDER)
def test_everyone_refuses_the_same_order_for_the_same_reason(tokenizer, messages, reason, index):
    for check in (lambda: tokenizer.render_conversation(messages), lambda: tokenizer.render_for_completion(messages),
                  lambda: tasks.common.validate_conversation({"messages": messages})):
        with pytest.raises(ConversationError) as e:
            check()
        assert str(e.value).startswith(f"message {index} {reason}"), str(e.value)
        assert (e.value.index, e.value.field) == (index, "role")
    e = server(messages)
    assert isinstance(e, RequestError) and e.status == 400
    err = e.response_body()["error"]
    assert err["message"].startswith(f"messages[{index}] {reason}"), err
    assert (err["code"], err["param"], err["type"]) == ("invalid_role", f"messages[{index}].role", "invalid_request_error")


@pytest.mark.parametrize("messages", [
    [], conv((S, "only a system prompt")), conv(("tool", "x")), [{"role": U}], ["hi"],
    conv((U, ["a"])), conv((U, "a"), (A, 3)), conv((U, "a"), (A, [{"type": "image", "text": "x"}])),
])
def test_everyone_refuses_malformed_conversations(tokenizer, messages):
    for check in (lambda: tokenizer.render_conversation(messages), lambda: tokenizer.render_for_completion(messages),
                  lambda: tasks.common.validate_conversation({"messages": messages})):
        with pytest.raises(ValueError):
            check()
    e = server(messages)
    assert isinstance(e, RequestError) and e.status == 400 and e.response_body()["error"]["message"]


def test_the_two_deliberate_differences(tokenizer):
    # strict (data files) vs tolerant (tokenizer, server): empty content, keys besides role and content
    stopped = conv((U, "hi"), (A, ""), (U, "again"))  # the web page sends back a reply stopped before its first token
    named = [{"role": U, "content": "hi", "name": "ops"}]
    for messages, reason in ((stopped, "message 1 (assistant): empty content"),
                             (named, "message 0 has keys besides 'role' and 'content' (name)")):
        with pytest.raises(ConversationError, match=re.escape(reason)):
            tasks.common.validate_conversation({"messages": messages})
        assert validate_conversation(messages, strict=False) is messages
        tokenizer.render_conversation(messages)
        assert server(messages).messages == [{"role": m["role"], "content": m["content"]} for m in messages]
    with pytest.raises(ConversationError, match='dict with a "messages" list$'):
        validate_conversation(stopped)  # a data file's row is the dict; the tokenizer also takes a bare list
    # a trailing assistant message: render_for_completion drops it, the server (which replies to it) refuses
    answered = conv((U, "hi"), (A, "hello"))
    assert tokenizer.render_for_completion(answered) == tokenizer.render_for_completion(answered[:1])
    e = server(answered)
    assert isinstance(e, RequestError) and e.param == "messages" and e.code == "invalid_role"
    assert e.message.startswith("the last message must have role 'user'")
    # a lone system message: the server's rule (the user's turn last) speaks first
    with pytest.raises(ConversationError, match="system message must be followed by a user message"):
        tokenizer.render_conversation(conv((S, "s")))
    assert server(conv((S, "s"))).message.startswith("the last message must have role 'user'")


def test_validator_contract():
    ok = {"messages": conv((S, "s"), (U, "u"), (A, [{"type": "text", "text": "t"}, {"type": "python", "text": "1+1"},
                                                    {"type": "python_output", "text": "2"}]))}
    assert validate_conversation(ok) is ok["messages"]
    assert content_text(ok["messages"][2]["content"]) == "t1+12" and content_text("plain") == "plain"
    with pytest.raises(ConversationError) as e:
        validate_conversation({"messages": []})
    assert (e.value.index, e.value.field, str(e.value)) == (None, None, "the conversation is empty: it has no messages")
    with pytest.raises(ConversationError, match=r"message 1 part 0: unknown part type 'bash' \(expected one of"):
        validate_conversation({"messages": conv((U, "a"), (A, [{"type": "bash", "text": "ls"}]))})
    with pytest.raises(ConversationError, match=r"message 1 \(assistant\): empty content"):
        validate_conversation({"messages": conv((U, "a"), (A, []))})
    validate_conversation(conv((U, "a"), (A, [])), strict=False)
