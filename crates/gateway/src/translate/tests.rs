use super::*;

/// The `(event name, data)` pairs of SSE bytes.
fn events(text: &[u8]) -> Vec<(String, Value)> {
    kilocloud_test_support::sse_events(std::str::from_utf8(text).unwrap())
}

/// Feeds `input` one byte at a time (every chunk boundary), then finishes.
fn translate_stream(from: Wire, to: Wire, input: &str) -> Vec<u8> {
    let mut t = StreamTranslator::new(from, to);
    let mut out = Vec::new();
    for b in input.as_bytes() {
        out.extend(t.feed(std::slice::from_ref(b)));
    }
    out.extend(t.finish());
    out
}

fn sse_text(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| match name {
            &"" => format!("data: {data}\n\n"),
            name => format!("event: {name}\ndata: {data}\n\n"),
        })
        .collect()
}

#[test]
fn chat_request_becomes_messages_with_alternating_turns_and_tool_results() {
    let chat = json!({
        "model": "m", "stream": true, "temperature": 0.2, "stop": "END", "user": "u1",
        "parallel_tool_calls": false, "tool_choice": "required",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "and kind", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "read", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "A"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "B"}]},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "read", "description": "reads", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}],
    });
    let m = request(Wire::Chat, Wire::Messages, chat).unwrap();
    assert_eq!(
        m["system"],
        json!([{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind", "cache_control": {"type": "ephemeral"}}])
    );
    assert_eq!(m["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(m["stop_sequences"], json!(["END"]));
    assert_eq!(m["metadata"], json!({"user_id": "u1"}));
    assert_eq!(m["stream"], true);
    assert_eq!(
        m["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        m["tools"],
        json!([{"name": "read", "description": "reads", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}])
    );
    let msgs = m["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(
        msgs[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
    );
    assert_eq!(
        msgs[0]["content"][2]["source"],
        json!({"type": "url", "url": "https://example.com/a.png"})
    );
    // The empty text is dropped; both calls become tool_use blocks.
    assert_eq!(
        msgs[1]["content"],
        json!([
            {"type": "tool_use", "id": "c1", "name": "read", "input": {"path": "a"}},
            {"type": "tool_use", "id": "c2", "name": "read", "input": {}},
        ])
    );
    // Both tool results and the next user text make one user turn, results first.
    assert_eq!(
        msgs[2]["content"],
        json!([
            {"type": "tool_result", "tool_use_id": "c1", "content": "A"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "B"},
            {"type": "text", "text": "thanks"},
        ])
    );
}

#[test]
fn chat_requests_that_cannot_be_carried_are_refused() {
    let bad_args = json!({"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{nope"}}]}]});
    assert_eq!(
        request(Wire::Chat, Wire::Messages, bad_args).unwrap_err(),
        TranslateError("messages[0]: a tool call's `arguments` is not JSON".into())
    );
    let audio =
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]});
    assert!(request(Wire::Chat, Wire::Messages, audio).is_err());
    let orphan = json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]});
    assert!(request(Wire::Chat, Wire::Messages, orphan).is_err());
    assert!(request(Wire::Chat, Wire::Messages, json!({"model": "m"})).is_err());
}

#[test]
fn messages_request_becomes_chat_with_tool_messages_before_the_text() {
    let req = json!({
        "model": "m", "max_tokens": 100, "stream": true, "stop_sequences": ["X"],
        "system": [{"type": "text", "text": "sys one"}, {"type": "text", "text": "sys two"}],
        "metadata": {"user_id": "u"},
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "tools": [
            {"name": "bash", "description": "runs", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        ],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "mid-turn note"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "running"},
                {"type": "tool_use", "id": "t1", "name": "bash", "input": {"cmd": "ls"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.txt"}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": true},
                {"type": "text", "text": "and?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QQ=="}},
            ]},
        ],
    });
    let c = request(Wire::Messages, Wire::Chat, req).unwrap();
    assert_eq!(c["max_tokens"], 100);
    assert_eq!(c["stop"], json!(["X"]));
    assert_eq!(c["user"], "u");
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(c["parallel_tool_calls"], false);
    assert_eq!(
        c["tools"],
        json!([{"type": "function", "function": {"name": "bash", "description": "runs", "parameters": {"type": "object"}}}]),
        "server tools run at Anthropic only and are left out"
    );
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "sys one\nsys two"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "system", "content": "mid-turn note"},
            {"role": "assistant", "content": "running", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "bash", "arguments": "{\"cmd\":\"ls\"}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "a.txt"},
            {"role": "tool", "tool_call_id": "t2", "content": "Error: boom"},
            {"role": "user", "content": [
                {"type": "text", "text": "and?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QQ=="}},
            ]},
        ])
    );
    // And back: the same conversation in Messages form.
    let back = request(Wire::Chat, Wire::Messages, c).unwrap();
    let roles: Vec<&str> = back["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(back["messages"][2]["content"][1]["content"], "Error: boom");
    assert_eq!(
        back["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
}

#[test]
fn responses_request_becomes_chat() {
    let req = json!({
        "model": "m", "instructions": "be exact", "max_output_tokens": 50, "store": false,
        "stream": true, "tool_choice": {"type": "function", "name": "get"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": true}},
        "tools": [{"type": "function", "name": "get", "description": "gets", "parameters": {"type": "object"}, "strict": false},
                  {"type": "web_search_preview"}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q"}, {"type": "input_image", "image_url": "https://x/i.png", "detail": "low"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
        ],
    });
    let c = request(Wire::Responses, Wire::Chat, req.clone()).unwrap();
    assert_eq!(c["max_tokens"], 50);
    assert_eq!(
        c["tool_choice"],
        json!({"type": "function", "function": {"name": "get"}})
    );
    assert_eq!(
        c["tools"],
        json!([{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}, "description": "gets", "strict": false}}])
    );
    assert_eq!(
        c["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "be exact"},
            {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "low"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "get", "arguments": "{\"a\":1}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "one"},
            {"role": "tool", "tool_call_id": "c2", "content": "two"},
            {"role": "assistant", "content": "done"},
        ])
    );
    // Through to an Anthropic provider in one step.
    let m = request(Wire::Responses, Wire::Messages, req).unwrap();
    assert_eq!(m["system"], json!([{"type": "text", "text": "be exact"}]));
    assert_eq!(m["max_tokens"], 50);
    let stateful = request(
        Wire::Responses,
        Wire::Chat,
        json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"}),
    );
    assert!(stateful.unwrap_err().0.contains("previous_response_id"));
    assert!(
        request(
            Wire::Responses,
            Wire::Chat,
            json!({"model": "m", "input": [{"type": "item_reference", "id": "x"}]})
        )
        .is_err()
    );
    assert_eq!(
        request(
            Wire::Responses,
            Wire::Chat,
            json!({"model": "m", "input": "hi"})
        )
        .unwrap()["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
}

#[test]
fn responses_convert_with_usage_stop_reasons_and_tool_calls() {
    let m = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
    });
    let c = response(Wire::Messages, Wire::Chat, m);
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(c["choices"][0]["message"]["content"], "hi");
    assert_eq!(
        c["choices"][0]["message"]["tool_calls"][0]["function"],
        json!({"name": "f", "arguments": "{\"a\":1}"})
    );
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
               "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20}})
    );
    // Chat → Messages: cache tokens come out of the input again.
    let back = response(Wire::Chat, Wire::Messages, c.clone());
    assert_eq!(
        back["usage"],
        json!({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20})
    );
    assert_eq!(back["stop_reason"], "tool_use");
    assert_eq!(
        back["content"][1],
        json!({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}})
    );
    // Chat → Responses.
    let r = response(Wire::Chat, Wire::Responses, c);
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(
        r["output"][0]["content"][0],
        json!({"type": "output_text", "text": "hi", "annotations": []})
    );
    assert_eq!(r["output"][1]["type"], "function_call");
    assert_eq!(r["output"][1]["call_id"], "t1");
    assert_eq!(r["usage"]["input_tokens"], 130);
    assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 100);
    // Stop reasons both ways.
    for (finish, stop) in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ] {
        assert_eq!(stop_reason(finish), stop);
        assert_eq!(finish_reason(stop), finish);
    }
    let long = response(
        Wire::Messages,
        Wire::Responses,
        json!({"content": [{"type": "text", "text": "x"}], "stop_reason": "max_tokens", "usage": {}}),
    );
    assert_eq!(long["status"], "incomplete");
    assert_eq!(
        long["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
}

#[test]
fn error_bodies_change_format() {
    let anthropic = br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#;
    assert_eq!(
        error_body(Wire::Messages, Wire::Chat, anthropic),
        json!({"error": {"message": "bad", "type": "invalid_request_error", "code": null}})
    );
    let openai = br#"{"error":{"message":"nope","type":"invalid_request_error","code":"x"}}"#;
    assert_eq!(
        error_body(Wire::Chat, Wire::Messages, openai),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "nope"}})
    );
    assert_eq!(
        error_body(Wire::Chat, Wire::Responses, b"upstream exploded")["error"]["message"],
        "upstream exploded"
    );
}

fn anthropic_stream() -> String {
    sse_text(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 3}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ])
}

#[test]
fn messages_stream_becomes_chat_chunks() {
    let out = translate_stream(Wire::Messages, Wire::Chat, &anthropic_stream());
    let evs = events(&out);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<&Value> = evs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d.is_object())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_1")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    let calls: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect();
    assert_eq!(calls[0]["id"], "t1");
    assert_eq!(calls[0]["function"]["name"], "f");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"a\":1}");
    assert!(calls.iter().all(|c| c["index"] == 0));
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("tool_calls")]);
    assert_eq!(
        chunks.last().unwrap()["usage"],
        json!({"prompt_tokens": 15, "completion_tokens": 9, "total_tokens": 24,
               "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0}})
    );
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

fn chat_stream() -> String {
    let chunk = |delta: Value, finish: Value| json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    sse_text(&[
        (
            "",
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        ),
        ("", chunk(json!({"content": "Hi"}), Value::Null)),
        ("", chunk(json!({"content": " there"}), Value::Null)),
        (
            "",
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
                Value::Null,
            ),
        ),
        (
            "",
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}),
                Value::Null,
            ),
        ),
        (
            "",
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]}),
                Value::Null,
            ),
        ),
        (
            "",
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}),
                Value::Null,
            ),
        ),
        ("", chunk(json!({}), json!("tool_calls"))),
        (
            "",
            json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt", "choices": [],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 10}}}),
        ),
    ]) + "data: [DONE]\n\n"
}

#[test]
fn chat_stream_becomes_messages_events() {
    let out = translate_stream(Wire::Chat, Wire::Messages, &chat_stream());
    let evs = events(&out);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    // The `type` of each event's data matches its name, as the SDKs expect.
    assert!(evs.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(evs[0].1["message"]["model"], "gpt");
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        evs[3].1["delta"],
        json!({"type": "text_delta", "text": " there"})
    );
    assert_eq!(
        evs[5].1["content_block"],
        json!({"type": "tool_use", "id": "call_a", "name": "f", "input": {}})
    );
    assert_eq!(evs[5].1["index"], 1);
    let args: String = evs[6..8]
        .iter()
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(args, "{\"x\":2}");
    assert_eq!(evs[9].1["content_block"]["id"], "call_b");
    assert_eq!(evs[9].1["index"], 2);
    assert_eq!(evs[12].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(
        evs[12].1["usage"],
        json!({"input_tokens": 30, "output_tokens": 7, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 0})
    );
}

#[test]
fn chat_stream_becomes_responses_events() {
    let out = translate_stream(Wire::Chat, Wire::Responses, &chat_stream());
    let evs = events(&out);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let seqs: Vec<u64> = evs
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..evs.len() as u64).collect::<Vec<_>>());
    assert!(evs.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(evs[6].1["text"], "Hi there");
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hi there");
    assert_eq!(done["output"][1]["arguments"], "{\"x\":2}");
    assert_eq!(done["output"][1]["call_id"], "call_a");
    assert_eq!(done["output"][2]["name"], "g");
    assert!(
        done["output"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "completed")
    );
    assert_eq!(done["usage"]["input_tokens"], 40);
    assert_eq!(done["usage"]["output_tokens"], 7);
    assert_eq!(done["id"], evs[0].1["response"]["id"]);
}

#[test]
fn messages_stream_reaches_responses_clients() {
    let out = translate_stream(Wire::Messages, Wire::Responses, &anthropic_stream());
    let evs = events(&out);
    let done = &evs.last().unwrap().1;
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["response"]["output"][1]["arguments"], "{\"a\":1}");
    assert_eq!(done["response"]["usage"]["input_tokens"], 15);
}

#[test]
fn streams_without_a_terminal_event_close_only_after_a_finish_reason() {
    let chunk = json!({"model": "gpt", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]});
    let finished = translate_stream(Wire::Chat, Wire::Messages, &format!("data: {chunk}\n\n"));
    let names: Vec<String> = events(&finished).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.last().unwrap(), "message_stop");
    let cut = json!({"model": "gpt", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]});
    let cut = translate_stream(Wire::Chat, Wire::Messages, &format!("data: {cut}\n\n"));
    assert!(
        !events(&cut)
            .iter()
            .any(|(n, _)| n == "message_stop" || n == "message_delta")
    );
}

#[test]
fn mid_stream_errors_keep_their_meaning() {
    let err = format!(
        "data: {}\n\n",
        json!({"error": {"message": "overloaded", "type": "server_error", "code": 529}})
    );
    let out = translate_stream(Wire::Chat, Wire::Messages, &err);
    let evs = events(&out);
    let last = &evs.last().unwrap();
    assert_eq!(last.0, "error");
    assert_eq!(
        last.1["error"],
        json!({"type": "server_error", "message": "overloaded"})
    );
    let anthropic_err = sse_text(&[(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
    )]);
    let out = translate_stream(Wire::Messages, Wire::Responses, &anthropic_err);
    let evs = events(&out);
    assert_eq!(evs.last().unwrap().0, "error");
    assert_eq!(evs.last().unwrap().1["message"], "busy");
    // A cut stream's closing event in each format.
    assert!(error_event(Wire::Chat, "m", "upstream_timeout").starts_with("data: {\"error\""));
    assert!(error_event(Wire::Messages, "m", "c").starts_with("event: error\n"));
    assert_eq!(
        events(error_event(Wire::Responses, "m", "c").as_bytes())[0].1["code"],
        "c"
    );
}
