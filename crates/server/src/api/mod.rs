//! The product HTTP API (identity: users, organizations, members, API keys, JWTs, tickets,
//! secrets, bots, audit; the model gateway) and its OpenAPI document, served at
//! `GET /api/openapi.json`.
//!
//! Routes are registered through `utoipa_axum`'s `OpenApiRouter`, so every route is in the
//! document; the access-matrix test walks the document to check every owner-scoped route.

pub mod automation;
mod bots;
pub mod ci;
pub mod claw;
pub mod cloud;
pub mod device;
pub mod gateway;
pub mod ingest;
mod orgs;
pub mod remote;
mod secrets;
pub mod sessions;
mod tickets;
mod tokens;
mod users;

use axum::Router;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// Sends a WebSocket close frame with `code` and `reason` (cut to 120 characters, within the
/// 123 bytes a close frame allows); a socket already gone is not an error.
pub(crate) async fn close_socket(
    socket: &mut axum::extract::ws::WebSocket,
    code: u16,
    reason: &str,
) {
    use axum::extract::ws::{CloseFrame, Message};
    let reason: String = reason.chars().take(120).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// The error body every route returns: `{"error":{"code","message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an [`ErrorBody`].
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `token_expired`, `insufficient_role`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kilo Cloud API",
        description = "Identity and access: users, organizations, API keys, tokens, tickets, secrets. \
            Authenticate with `Authorization: Bearer <JWT or kc_ API key>`; act for an organization \
            with `X-KiloCode-OrganizationId: <uuid>`."
    ),
    modifiers(&Security),
    // Routed outside the OpenAPI router (its id takes the rest of the path).
    paths(gateway::v1_model),
    tags(
        (name = "users"), (name = "organizations"), (name = "tokens"),
        (name = "tickets"), (name = "secrets"), (name = "bots"), (name = "gateway"), (name = "sessions"),
        (name = "github"), (name = "triggers"), (name = "review"), (name = "claw"),
        (name = "cli-sessions")
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A user JWT (HS256, version 3) or an API key `kc_…`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "internal",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-internal-api-key"))),
        );
    }
}

/// The identity routes and the OpenAPI document describing them.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::me))
        .routes(routes!(users::profile))
        .routes(routes!(users::user))
        .routes(routes!(gateway::defaults))
        .routes(routes!(gateway::org_defaults))
        .routes(routes!(users::rotate_pepper))
        .routes(routes!(users::create_user))
        .routes(routes!(users::my_audit))
        .routes(routes!(orgs::create_org, orgs::list_orgs))
        .routes(routes!(orgs::get_org, orgs::rename_org, orgs::delete_org))
        .routes(routes!(orgs::list_members))
        .routes(routes!(orgs::put_member, orgs::remove_member))
        .routes(routes!(orgs::org_audit))
        .routes(routes!(tokens::create_key, tokens::list_keys))
        .routes(routes!(tokens::revoke_key))
        .routes(routes!(tokens::issue_jwt))
        .routes(routes!(device::create_code))
        .routes(routes!(device::poll_code))
        .routes(routes!(device::approve_code))
        .routes(routes!(device::deny_code))
        .routes(routes!(tickets::issue_ticket))
        .routes(routes!(tickets::redeem_ticket))
        .routes(routes!(secrets::list_secrets))
        .routes(routes!(secrets::put_secret, secrets::delete_secret))
        .routes(routes!(bots::create_bot, bots::list_bots))
        .routes(routes!(bots::delete_bot))
        .routes(routes!(gateway::chat_completions))
        .routes(routes!(gateway::openrouter_chat_completions))
        .routes(routes!(gateway::v1_chat_completions))
        .routes(routes!(gateway::v1_embeddings))
        .routes(routes!(gateway::v1_messages))
        .routes(routes!(gateway::v1_count_tokens))
        .routes(routes!(gateway::openrouter_messages))
        .routes(routes!(gateway::v1_responses))
        .routes(routes!(gateway::openrouter_responses))
        .routes(routes!(gateway::fim_completions))
        .routes(routes!(cloud::start))
        .routes(routes!(cloud::send))
        .routes(routes!(cloud::get_message_result))
        .routes(routes!(cloud::stream_ticket))
        .routes(routes!(cloud::stream))
        .routes(routes!(gateway::openrouter_models))
        .routes(routes!(gateway::org_models))
        .routes(routes!(gateway::models))
        .routes(routes!(gateway::v1_models))
        .routes(routes!(gateway::providers))
        .routes(routes!(gateway::balance))
        .routes(routes!(gateway::usage))
        .routes(routes!(gateway::get_policy, gateway::put_policy))
        .routes(routes!(sessions::prepare, sessions::list))
        .routes(routes!(sessions::get_session, sessions::delete_session))
        .routes(routes!(sessions::initiate))
        .routes(routes!(sessions::send_message))
        .routes(routes!(sessions::interrupt))
        .routes(routes!(sessions::export))
        .routes(routes!(sessions::events))
        .routes(routes!(sessions::stream))
        .routes(routes!(ingest::create, ingest::list))
        .routes(routes!(ingest::get, ingest::delete))
        .routes(routes!(ingest::ingest))
        .routes(routes!(ingest::share))
        .routes(routes!(ingest::unshare))
        .routes(routes!(ingest::title))
        .routes(routes!(ingest::export))
        .routes(routes!(ingest::shared))
        .routes(routes!(remote::socket))
        .routes(routes!(ci::create_agent_token))
        .routes(routes!(ci::agents))
        .routes(routes!(ci::create_source, ci::sources))
        .routes(routes!(ci::generic_webhook))
        .routes(routes!(ci::runs))
        .routes(routes!(ci::run))
        .routes(routes!(ci::job_logs))
        .routes(routes!(ci::cancel))
        .routes(routes!(ci::rerun))
        .routes(routes!(ci::log_stream))
        .routes(routes!(ci::agent_socket))
        .routes(routes!(remote::connections))
        .routes(routes!(claw::list_instances, claw::create_instance))
        .routes(routes!(claw::get_instance, claw::destroy_instance))
        .routes(routes!(claw::instance_status))
        .routes(routes!(claw::start_instance))
        .routes(routes!(claw::stop_instance))
        .routes(routes!(claw::restart_instance))
        .routes(routes!(claw::issue_access_code))
        .routes(routes!(claw::platform_provision))
        .routes(routes!(claw::platform_start))
        .routes(routes!(claw::platform_stop))
        .routes(routes!(claw::platform_destroy))
        .routes(routes!(claw::platform_doctor))
        .routes(routes!(claw::platform_status))
        .routes(routes!(claw::platform_gateway_token))
        .routes(routes!(claw::platform_kilocode_config))
        .routes(routes!(claw::platform_channels))
        .routes(routes!(automation::github_webhook))
        .routes(routes!(
            automation::list_installations,
            automation::claim_installation
        ))
        .routes(routes!(automation::release_installation))
        .routes(routes!(
            automation::create_trigger,
            automation::list_triggers
        ))
        .routes(routes!(
            automation::get_trigger,
            automation::update_trigger,
            automation::delete_trigger
        ))
        .routes(routes!(automation::trigger_requests))
        .routes(routes!(automation::trigger_request))
        .routes(routes!(automation::inbound))
        .routes(routes!(
            automation::get_review_settings,
            automation::put_review_settings
        ))
        .routes(routes!(automation::list_reviews))
        .routes(routes!(automation::get_review))
        .split_for_parts()
}

/// Query of paged audit listings.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries with `seq` below this (the `seq` of the last entry of the previous page).
    pub before: Option<u64>,
    /// Most entries to return, 1–1000. Default 100.
    pub limit: Option<usize>,
}

impl AuditQuery {
    fn limit(&self) -> Result<usize, crate::ApiError> {
        match self.limit.unwrap_or(100) {
            n @ 1..=1000 => Ok(n),
            _ => Err(crate::ApiError::bad_request("limit must be 1 to 1000")),
        }
    }
}

/// A page of audit entries, newest first.
#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<kilocloud_identity::model::AuditEntry>,
}
