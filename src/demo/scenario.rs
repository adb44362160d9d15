//! The demo's scripted scenario: real calls through the sidecar, each printed with its
//! outcome. Returns what happened so tests can check it.

use crate::client::AespGridClient;
use crate::client::{self, ClientTls};
use crate::proto::{aesp, grid};

/// One step of the scenario.
#[derive(Debug, Clone)]
pub struct Step {
    pub title: String,
    pub allowed: bool,
    /// The `EnterpriseError` code of a denial or of an in-band error.
    pub error_code: Option<String>,
    pub detail: String,
}

fn print_step(n: usize, s: &Step) {
    let verdict = if s.allowed { "ALLOWED" } else { "DENIED " };
    println!("  {n:>2}. {:<58} {verdict}", s.title);
    for line in s.detail.lines() {
        println!("        {line}");
    }
}

fn call(session: &str, tool: &str, a: serde_json::Value) -> grid::ToolCall {
    // The scenario's arguments are JSON object literals.
    client::tool_call(session, tool, &a).unwrap_or_default()
}

/// Renders a `ToolResult` (decoded as its enterprise view) for people.
pub fn render_result(r: &aesp::EnterpriseToolResult) -> (bool, Option<String>, String) {
    if let Some(e) = &r.error_details {
        return (true, Some(e.code.clone()), client::describe(e));
    }
    let content = r
        .payload
        .as_ref()
        .and_then(|p| p.content.as_ref())
        .map(crate::adm::value_to_json)
        .unwrap_or(serde_json::Value::Null);
    (
        true,
        None,
        format!("result: {content}  (correlation_id {})", r.correlation_id),
    )
}

fn denied(title: String, status: &tonic::Status) -> Step {
    Step {
        title,
        allowed: false,
        error_code: client::enterprise_error(status).map(|e| e.code),
        detail: client::describe_status(status),
    }
}

/// The step of a call the sidecar is expected to refuse.
fn expect_denied<T>(title: String, r: Result<T, tonic::Status>) -> Step {
    match r {
        Ok(_) => Step {
            title,
            allowed: true,
            error_code: None,
            detail: "unexpectedly allowed".into(),
        },
        Err(s) => denied(title, &s),
    }
}

async fn execute(c: &AespGridClient, title: String, tc: grid::ToolCall) -> Step {
    match c.execute_tool(tc).await {
        Ok(view) => {
            let (allowed, error_code, detail) = render_result(&view);
            Step {
                title,
                allowed,
                error_code,
                detail,
            }
        }
        Err(s) => denied(title, &s),
    }
}

/// A client of the scenario: its certificate and its token.
pub struct Party<'a> {
    pub tls: &'a ClientTls,
    pub token: &'a str,
}

/// Runs the scenario against the sidecar at `endpoint` with the dev certificates and tokens.
pub async fn run(endpoint: &str, acme: Party<'_>, globex: Party<'_>) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let plain = client::channel(endpoint, Some(acme.tls)).await?;
    let ch = client::with_token(plain.clone(), Some(acme.token))?;
    let alice = AespGridClient::with_token(ch.clone());

    // 0. Clients present a token: without one, or with a forged one, nothing passes.
    let title = "CreateSession as alice without a token".to_string();
    steps.push(expect_denied(
        title,
        AespGridClient::new(plain.clone())
            .create_session(grid::CreateSession::default())
            .await,
    ));
    let title = "CreateSession as alice with a forged token".to_string();
    let forged_token = forge(acme.token);
    steps.push(expect_denied(
        title,
        AespGridClient::with_token(client::with_token(plain, Some(&forged_token))?)
            .create_session(grid::CreateSession::default())
            .await,
    ));

    // 1. A session for alice@acme; the sidecar fills in the EnterpriseSecurityContext.
    let session = match alice
        .create_session(grid::CreateSession {
            ttl_seconds: 600,
            ..Default::default()
        })
        .await
    {
        Ok(ack) => {
            steps.push(Step {
                title: "CreateSession as alice (tenant acme)".into(),
                allowed: true,
                error_code: None,
                detail: format!("session_id: {}", ack.session_id),
            });
            ack.session_id
        }
        Err(s) => {
            steps.push(denied("CreateSession as alice (tenant acme)".into(), &s));
            String::new()
        }
    };

    steps.push(
        execute(
            &alice,
            "ExecuteTool echo {\"text\": \"hello, GRID\"}".into(),
            call(&session, "echo", serde_json::json!({"text": "hello, GRID"})),
        )
        .await,
    );
    steps.push(
        execute(
            &alice,
            "ExecuteTool add {\"a\": 2, \"b\": 40}".into(),
            call(&session, "add", serde_json::json!({"a": 2, "b": 40})),
        )
        .await,
    );

    // Streaming.
    let title = "ExecuteToolStream count {\"n\": 3}".to_string();
    match alice
        .execute_tool_stream(call(&session, "count", serde_json::json!({"n": 3})))
        .await
    {
        Ok(mut stream) => {
            let mut chunks = Vec::new();
            let mut err = None;
            loop {
                match stream.message().await {
                    Ok(Some(c)) => chunks.push(format!(
                        "chunk {}: {}{}",
                        c.chunk_id,
                        String::from_utf8_lossy(&c.payload),
                        if c.is_final { " (final)" } else { "" }
                    )),
                    Ok(None) => break,
                    Err(s) => {
                        err = Some(s);
                        break;
                    }
                }
            }
            match err {
                None => steps.push(Step {
                    title,
                    allowed: true,
                    error_code: None,
                    detail: chunks.join("\n"),
                }),
                Some(s) => steps.push(denied(title, &s)),
            }
        }
        Err(s) => steps.push(denied(title, &s)),
    }

    // A tool error: travels back as an EnterpriseError that a base client still reads as Error.
    steps.push(
        execute(
            &alice,
            "ExecuteTool fail {} (the tool always errors)".into(),
            call(&session, "fail", serde_json::json!({})),
        )
        .await,
    );
    // Arguments the approved contract refuses: the sidecar answers, the host never sees them.
    steps.push(
        execute(
            &alice,
            "ExecuteTool add {\"a\": \"two\", \"b\": 1} (bad arguments, checked against the approved contract)".into(),
            call(&session, "add", serde_json::json!({"a": "two", "b": 1})),
        )
        .await,
    );
    // A tool whose contract waits for review (tool-contracts.yaml: PENDING).
    steps.push(
        execute(
            &alice,
            "ExecuteTool delete_records (its contract is PENDING review)".into(),
            call(
                &session,
                "delete_records",
                serde_json::json!({"customer_id": "c-17", "reason": "gdpr-erasure"}),
            ),
        )
        .await,
    );

    // Denials made by the sidecar itself: a tool outside alice's role (RBAC, rbac.yaml).
    steps.push(
        execute(
            &alice,
            "ExecuteTool billing_refund {} (not a tool of alice's role)".into(),
            call(&session, "billing_refund", serde_json::json!({})),
        )
        .await,
    );
    // Denials made by the sidecar itself.
    let title = "CreateSession as alice claiming tenant globex".to_string();
    let forged = grid::CreateSession {
        security_context: Some(grid::SecurityContext {
            principal_id: "alice".into(),
            tenant_id: "globex".into(),
        }),
        ..Default::default()
    };
    steps.push(expect_denied(title, alice.create_session(forged).await));

    let title = "Call /altar.grid.v1.GridHost/DropAllSessions (unknown method)".to_string();
    steps.push(expect_denied(
        title,
        client::call_raw(ch.clone(), "/altar.grid.v1.GridHost/DropAllSessions").await,
    ));

    // bob@globex gets a session of his own: the identity comes from his certificate.
    let ch_bob = client::channel(endpoint, Some(globex.tls)).await?;
    let bob = AespGridClient::with_token(client::with_token(ch_bob, Some(globex.token))?);
    let title = "CreateSession as bob (tenant globex)".to_string();
    match bob.create_session(grid::CreateSession::default()).await {
        Ok(ack) => steps.push(Step {
            title,
            allowed: true,
            error_code: None,
            detail: format!("session_id: {}", ack.session_id),
        }),
        Err(s) => steps.push(denied(title, &s)),
    }

    if !session.is_empty() {
        // Tenant isolation: bob may not use alice's session.
        let title = "ExecuteTool echo as bob in alice's session (another tenant's)".to_string();
        steps.push(expect_denied(
            title,
            bob.execute_tool(call(&session, "echo", serde_json::json!({"text": "peek"})))
                .await,
        ));
        let title = "DestroySession (alice's session)".to_string();
        match alice
            .destroy_session(grid::DestroySession {
                session_id: session.clone(),
            })
            .await
        {
            Ok(ack) => steps.push(Step {
                title,
                allowed: true,
                error_code: None,
                detail: format!("destroyed: {}", ack.destroyed),
            }),
            Err(s) => steps.push(denied(title, &s)),
        }
    }

    for (i, s) in steps.iter().enumerate() {
        print_step(i + 1, s);
    }
    Ok(steps)
}

/// `token` with its payload changed (tenant globex) and its signature kept: what a caller
/// who edits their token sends.
fn forge(token: &str) -> String {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.trim().splitn(3, '.');
    let (h, p, s) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let forged = e
        .decode(p)
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .map(|mut c| {
            c["tenant"] = serde_json::json!("globex");
            e.encode(c.to_string())
        })
        .unwrap_or_default();
    format!("{h}.{forged}.{s}")
}
