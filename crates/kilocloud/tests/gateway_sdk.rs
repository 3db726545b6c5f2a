//! Compatibility: the official `openai` and `anthropic` Python SDKs (from PyPI, installed by
//! `scripts/test` into a venv named by `KILOCLOUD_TEST_PYTHON`) talk to a real `kilocloud serve`
//! whose gateway points at the fake upstreams: chat, streaming, tools (streamed and not), the
//! model list, a 402 surfacing as the SDK's error; Anthropic Messages with `x-api-key` and with a
//! bearer token; the Responses API (text, streaming, a tool call and its output). Then each SDK
//! against the model of the other provider kind, through the gateway's translation. The gateway
//! charges what the SDKs' requests cost.

mod common;

use std::time::Duration;

use common::{Node, Store};
use kilocloud_test_support::fake_anthropic::{FakeAnthropic, Reply as AnthropicReply};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use serde_json::{Value, json};

const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key, broke_key, model = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
ask = [{"role": "user", "content": "hello"}]
tools = [{"type": "function", "function": {"name": "read_file", "description": "read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
out = {}
r = client.chat.completions.create(model=model, messages=ask)
out["text"] = r.choices[0].message.content
out["prompt_tokens"] = r.usage.prompt_tokens
parts = []
for chunk in client.chat.completions.create(model=model, messages=ask, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
out["streamed"] = "".join(parts)
t = client.chat.completions.create(model=model, messages=ask, tools=tools)
call = t.choices[0].message.tool_calls[0]
out["tool"] = [call.function.name, json.loads(call.function.arguments)]
args, name = "", None
for chunk in client.chat.completions.create(model=model, messages=ask, tools=tools, stream=True):
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        d = chunk.choices[0].delta.tool_calls[0]
        name = name or d.function.name
        args += d.function.arguments or ""
out["streamed_tool"] = [name, json.loads(args)]
out["models"] = [m.id for m in client.models.list().data]
try:
    OpenAI(base_url=base, api_key=broke_key, max_retries=0).chat.completions.create(model=model, messages=ask)
    out["broke"] = "served"
except openai.APIStatusError as e:
    out["broke"] = e.status_code
print(json.dumps(out))
"#;

const ANTHROPIC_SCRIPT: &str = r#"
import json, sys
import anthropic

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
ask = [{"role": "user", "content": "hello"}]
tools = [{"name": "read_file", "description": "read a file",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
out = {}
m = client.messages.create(model=model, max_tokens=100, messages=ask)
out["text"] = m.content[0].text
out["input_tokens"] = m.usage.input_tokens
with client.messages.stream(model=model, max_tokens=100, messages=ask) as s:
    out["streamed"] = s.get_final_text()
t = client.messages.create(model=model, max_tokens=100, messages=ask, tools=tools)
use = [b for b in t.content if b.type == "tool_use"][0]
out["tool"] = [use.name, use.input]
with client.messages.stream(model=model, max_tokens=100, messages=ask, tools=tools) as s:
    final = s.get_final_message()
use = [b for b in final.content if b.type == "tool_use"][0]
out["streamed_tool"] = [use.name, use.input]
bearer = anthropic.Anthropic(base_url=base, auth_token=key, max_retries=0)
out["bearer"] = bearer.messages.create(model=model, max_tokens=100, messages=ask).content[0].text
print(json.dumps(out))
"#;

const RESPONSES_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
r = client.responses.create(model=model, input="hello", instructions="be brief", store=False)
out["text"] = r.output_text
out["input_tokens"] = r.usage.input_tokens
parts = []
with client.responses.stream(model=model, input="hello", store=False) as s:
    for event in s:
        if event.type == "response.output_text.delta":
            parts.append(event.delta)
    final = s.get_final_response()
out["streamed"] = "".join(parts)
out["final"] = final.output_text
tools = [{"type": "function", "name": "read_file", "description": "read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]
t = client.responses.create(model=model, input="read it", tools=tools, store=False)
call = [o for o in t.output if o.type == "function_call"][0]
out["tool"] = [call.name, json.loads(call.arguments)]
follow = client.responses.create(model=model, tools=tools, store=False, input=[
    {"role": "user", "content": "read it"},
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "fn main() {}"},
])
out["follow"] = follow.output_text
print(json.dumps(out))
"#;

/// Runs `script` with `python` and `args`; its JSON output.
async fn run_script(python: &str, script: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "SDK script failed ({args:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn sdk_round_trip(store: Store) {
    let python = std::env::var("KILOCLOUD_TEST_PYTHON").expect(
        "KILOCLOUD_TEST_PYTHON is not set: run the tests with scripts/test, which installs the \
         openai SDK into a venv",
    );
    let upstream = FakeOpenAi::start().await;
    let claude = FakeAnthropic::start().await;
    let config = store.dir().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
[[gateway.providers]]
id = "fake"
kind = "openai-compatible"
base_url = "{}"
api_key = "upstream-key"
[[gateway.providers.models]]
id = "vendor/paid"
context_length = 100000
input_price = 3.0
output_price = 15.0
[[gateway.providers]]
id = "claude"
kind = "anthropic"
base_url = "{}"
api_key = "anthropic-upstream-key"
[[gateway.providers.models]]
id = "anthropic/claude-test"
input_price = 3.0
output_price = 15.0
"#,
            upstream.base_url, claude.base_url
        ),
    )
    .unwrap();
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let log = std::fs::read_to_string(store.dir().join("node.log")).unwrap();
    let admin_key = log
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kc_"))
        .expect("bootstrap key")
        .to_owned();
    let http = reqwest::Client::new();
    let me: Value = http
        .get(node.url("/api/users/me"))
        .bearer_auth(&admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = format!("user:{}", me["user"]["id"].as_str().unwrap());
    let granted = http
        .post(node.url("/api/admin/credits"))
        .bearer_auth(&admin_key)
        .json(&json!({"owner": admin, "amountMicrodollars": 1_000_000, "note": "sdk test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    let broke: Value = http
        .post(node.url("/api/users"))
        .bearer_auth(&admin_key)
        .json(&json!({"email": "broke@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let broke_key = broke["apiKey"].as_str().unwrap().to_owned();

    upstream.push(Reply::text("hello from the fake", 10, 5));
    upstream.push(Reply::text("a streamed answer", 20, 3));
    let read = || Reply::ToolCall {
        name: "read_file".into(),
        arguments: r#"{"path": "src/main.rs"}"#.into(),
    };
    upstream.push(read());
    upstream.push(read());

    let openai_base = node.url("/api/gateway/v1");
    let args = [openai_base.as_str(), &admin_key, &broke_key, "vendor/paid"];
    let got = run_script(&python, SCRIPT, &args).await;
    assert_eq!(got["text"], "hello from the fake");
    assert_eq!(got["prompt_tokens"], 10);
    assert_eq!(got["streamed"], "a streamed answer");
    assert_eq!(got["tool"], json!(["read_file", {"path": "src/main.rs"}]));
    assert_eq!(
        got["streamed_tool"],
        json!(["read_file", {"path": "src/main.rs"}])
    );
    assert_eq!(
        got["models"],
        json!(["vendor/paid", "anthropic/claude-test"])
    );
    assert_eq!(got["broke"], 402);

    // 10×3+5×15 = 105; 20×3+3×15 = 105; two tool calls of 20×3+8×15 = 180 each. Usage is
    // recorded just after each response.
    let charged = |expected: i64| {
        let (http, url, key) = (
            http.clone(),
            node.url("/api/profile/balance"),
            admin_key.clone(),
        );
        move || {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move {
                let balance: Value = http
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                balance["balanceMicrodollars"] == expected
            }
        }
    };
    let expected = 1_000_000 - 105 - 105 - 180 - 180;
    node.wait_until(
        "the OpenAI SDK's requests are charged",
        Duration::from_secs(10),
        charged(expected),
    )
    .await;
    assert_eq!(
        upstream.requests().len(),
        4,
        "the refused request never reached the provider"
    );
    // The anthropic SDK, with x-api-key and with a bearer token.
    let text = |t: &str| AnthropicReply::text(t, 10, 5);
    let tool = || AnthropicReply::ToolUse {
        name: "read_file".into(),
        input: json!({"path": "src/lib.rs"}),
    };
    for reply in [
        text("hi from claude"),
        text("a streamed claude answer"),
        tool(),
        tool(),
        text("bearer works"),
    ] {
        claude.push(reply);
    }
    let anthropic_base = node.url("/api/gateway");
    let got = run_script(
        &python,
        ANTHROPIC_SCRIPT,
        &[&anthropic_base, &admin_key, "anthropic/claude-test"],
    )
    .await;
    assert_eq!(got["text"], "hi from claude");
    assert_eq!(got["input_tokens"], 10);
    assert_eq!(got["streamed"], "a streamed claude answer");
    assert_eq!(got["tool"], json!(["read_file", {"path": "src/lib.rs"}]));
    assert_eq!(
        got["streamed_tool"],
        json!(["read_file", {"path": "src/lib.rs"}])
    );
    assert_eq!(got["bearer"], "bearer works");
    let sent = claude.requests();
    assert_eq!(sent[0].headers["x-api-key"], "anthropic-upstream-key");
    assert!(sent[0].headers.get("anthropic-version").is_some());
    assert_eq!(sent[0].body["model"], "anthropic/claude-test");
    // Three texts of 10×3+5×15 = 105 and two tool uses of 30×3+12×15 = 270.
    let expected = expected - 3 * 105 - 2 * 270;
    node.wait_until(
        "the anthropic SDK's requests are charged",
        Duration::from_secs(10),
        charged(expected),
    )
    .await;

    // Each SDK on the other kind of provider: translated both ways.
    for reply in [
        text("claude via chat"),
        text("claude streamed"),
        tool(),
        tool(),
    ] {
        claude.push(reply);
    }
    let args = [
        openai_base.as_str(),
        &admin_key,
        &broke_key,
        "anthropic/claude-test",
    ];
    let got = run_script(&python, SCRIPT, &args).await;
    assert_eq!(
        (&got["text"], &got["prompt_tokens"], &got["streamed"]),
        (
            &json!("claude via chat"),
            &json!(10),
            &json!("claude streamed")
        )
    );
    assert_eq!(got["tool"], json!(["read_file", {"path": "src/lib.rs"}]));
    assert_eq!(
        got["streamed_tool"],
        json!(["read_file", {"path": "src/lib.rs"}])
    );
    assert_eq!(got["broke"], 402);
    upstream.push(Reply::text("chat via messages", 10, 5));
    upstream.push(Reply::text("chat streamed via messages", 10, 5));
    upstream.push(read());
    upstream.push(read());
    upstream.push(Reply::text("bearer works", 10, 5));
    let got = run_script(
        &python,
        ANTHROPIC_SCRIPT,
        &[&anthropic_base, &admin_key, "vendor/paid"],
    )
    .await;
    assert_eq!(
        (&got["text"], &got["input_tokens"], &got["streamed"]),
        (
            &json!("chat via messages"),
            &json!(10),
            &json!("chat streamed via messages")
        )
    );
    assert_eq!(got["tool"], json!(["read_file", {"path": "src/main.rs"}]));
    assert_eq!(
        got["streamed_tool"],
        json!(["read_file", {"path": "src/main.rs"}])
    );
    assert_eq!(got["bearer"], "bearer works");
    // OpenAI's tool-call pairing held on the translated conversation (the fake enforces it).
    assert!(upstream.requests().len() >= 9);

    // The Responses API, on either kind of provider.
    upstream.push(Reply::text("responses text", 10, 5));
    upstream.push(Reply::text("responses streamed", 10, 5));
    upstream.push(read());
    upstream.push(Reply::text("read it all", 10, 5));
    for reply in [
        text("claude responds"),
        text("claude streams"),
        tool(),
        text("claude read it"),
    ] {
        claude.push(reply);
    }
    for (model, expected) in [
        (
            "vendor/paid",
            [
                "responses text",
                "responses streamed",
                "src/main.rs",
                "read it all",
            ],
        ),
        (
            "anthropic/claude-test",
            [
                "claude responds",
                "claude streams",
                "src/lib.rs",
                "claude read it",
            ],
        ),
    ] {
        let got = run_script(
            &python,
            RESPONSES_SCRIPT,
            &[&openai_base, &admin_key, model],
        )
        .await;
        assert_eq!(got["text"], expected[0], "{model}: {got}");
        assert_eq!(got["input_tokens"], 10, "{model}: {got}");
        assert_eq!(
            (&got["streamed"], &got["final"]),
            (&json!(expected[1]), &json!(expected[1])),
            "{model}"
        );
        assert_eq!(
            got["tool"],
            json!(["read_file", {"path": expected[2]}]),
            "{model}"
        );
        assert_eq!(got["follow"], expected[3], "{model}");
    }
    let last = claude.requests().pop().unwrap();
    assert_eq!(
        last.body["messages"][2]["content"][0]["type"], "tool_result",
        "{}",
        last.body
    );
    // OpenAI SDK on Claude: 2 × 105 + 2 × 270; Anthropic SDK on the fake: 3 × 105 + 2 × 180;
    // Responses: 3 × 105 + 180 on the fake, 3 × 105 + 270 on Claude.
    let expected =
        expected - (2 * 105 + 2 * 270) - (3 * 105 + 2 * 180) - (3 * 105 + 180) - (3 * 105 + 270);
    node.wait_until(
        "the translated requests are charged",
        Duration::from_secs(10),
        charged(expected),
    )
    .await;
}

#[tokio::test]
async fn sdks_sqlite() {
    sdk_round_trip(Store::sqlite().await).await;
}

#[tokio::test]
async fn sdks_postgres() {
    sdk_round_trip(Store::postgres().await).await;
}
