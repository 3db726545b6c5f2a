//! KiloClaw routes (reference kilo-cloud.md §2 "Routes"): the owner-scoped user API under
//! `/api/claw/instances` (an organization's with `X-KiloCode-OrganizationId`; reads need
//! `member`, changes `admin`; another owner's instance is 404), and the platform API under
//! `/api/platform/*` for a trusted backend (`x-internal-api-key`, compared in constant time;
//! the user comes from the body or query). The proxy and the access gateway are in
//! [`crate::claw_proxy`].

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use kilocloud_claw::instance::{ConfigPatch, ModelEntry};
use kilocloud_claw::provider::ExecOutput;
use kilocloud_claw::{Claw, ClawError, CreateInstance, InstanceRef, InstanceView};
use kilocloud_identity::Owner;
use kilocloud_identity::model::Initiator;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ErrorBody;
use crate::auth::{Admin, Internal, Member, PersonalRole, RequireRole};
use crate::{ApiError, AppState, Json};

impl From<ClawError> for ApiError {
    fn from(e: ClawError) -> Self {
        let message = e.to_string();
        match e {
            ClawError::NotFound => ApiError::not_found(message),
            ClawError::NotProvisioned => {
                ApiError::new(StatusCode::NOT_FOUND, "not_provisioned", message)
            }
            ClawError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            ClawError::Invalid(_) => ApiError::bad_request(message),
            ClawError::Limit(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "instance_limit", message)
            }
            ClawError::Provider(p) if p.status == 0 || p.status >= 500 || p.status == 408 => {
                ApiError {
                    retry_after_secs: Some(5),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "provider_unavailable",
                        p.to_string(),
                    )
                }
            }
            ClawError::Provider(p) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "provider_error", p.to_string())
            }
            ClawError::Identity(e) => e.into(),
            ClawError::Substrate(e) => e.into(),
        }
    }
}

/// The KiloClaw service, or 503 `claw_disabled`.
pub fn claw(s: &AppState) -> Result<&Claw, ApiError> {
    s.claw.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "claw_disabled",
            "KiloClaw is not enabled on this server (claw.enabled)",
        )
    })
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("instance not found"))
}

/// An access code and where to redeem it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessCodeView {
    /// The code as shown: `XXXXX-XXXXX` (10 chars from a 32-char alphabet without `I`, `O`,
    /// `0`, `1`).
    pub code: String,
    /// Expiry, ms since epoch (10 min after issue).
    pub expires_at: i64,
    /// The access gateway page for this instance, relative to the server, with the code
    /// filled in; it sets a 24 h cookie and opens `/i/<id>/`.
    pub path: String,
}

/// `GET /api/claw/instances`: the owner's instances, newest first.
#[utoipa::path(get, path = "/api/claw/instances", tag = "claw",
    security(("bearer" = [])),
    responses((status = 200, body = Vec<Object>), (status = 503, body = ErrorBody)))]
pub async fn list_instances(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Member>,
) -> Result<Json<Vec<InstanceView>>, ApiError> {
    Ok(Json(claw(&s)?.list(scope.owner()).await?))
}

/// `POST /api/claw/instances`: creates an instance (app, volume, then the runtime is
/// started unless `start: false`). 201 with the instance.
#[utoipa::path(post, path = "/api/claw/instances", tag = "claw",
    security(("bearer" = [])),
    request_body(content = Object, description = "{name?, envVars?, secrets?, defaultModel?, models?, region?, machineSize?, start?}"),
    responses((status = 201, body = Object), (status = 400, body = ErrorBody),
        (status = 429, description = "instance limit", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn create_instance(
    State(s): State<AppState>,
    // Personal: the runtime gets a 30-day key of the caller's, which an org's key or a bot
    // must not be able to mint.
    PersonalRole(scope, _): PersonalRole<Admin>,
    Json(request): Json<CreateInstance>,
) -> Result<(StatusCode, Json<InstanceView>), ApiError> {
    let claw = claw(&s)?;
    let by = scope.auth.initiator();
    let view = claw
        .create(scope.owner(), scope.auth.principal.user, request, &by)
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn found(s: &AppState, owner: Owner, id: &str) -> Result<(Claw, InstanceRef), ApiError> {
    let claw = claw(s)?.clone();
    let found = claw.find(owner, parse_id(id)?).await?;
    Ok((claw, found))
}

/// `GET /api/claw/instances/{id}`: one instance.
#[utoipa::path(get, path = "/api/claw/instances/{id}", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get_instance(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Member>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    Ok(Json(claw.view(&found).await?))
}

/// `GET /api/claw/instances/{id}/status`: the instance with a live machine check (at most
/// every 30 s; the result is not persisted, the reconciliation alarm owns that).
#[utoipa::path(get, path = "/api/claw/instances/{id}/status", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn instance_status(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Member>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    Ok(Json(claw.view(&found).await?))
}

/// `DELETE /api/claw/instances/{id}`: destroys the instance in two phases. 200 with
/// `{complete}`: false when the provider still has to confirm a delete (retried every
/// minute; the proxy answers 409 meanwhile).
#[utoipa::path(delete, path = "/api/claw/instances/{id}", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn destroy_instance(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    let complete = claw.destroy(&found).await?;
    Ok(Json(
        serde_json::json!({"id": found.row.id, "complete": complete}),
    ))
}

/// `POST /api/claw/instances/{id}/start`: starts the runtime (creating its machine when
/// needed). 409 while destroying.
#[utoipa::path(post, path = "/api/claw/instances/{id}/start", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start_instance(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    Ok(Json(claw.start(&found).await?))
}

/// `POST /api/claw/instances/{id}/stop`: stops the runtime (its volume is kept).
#[utoipa::path(post, path = "/api/claw/instances/{id}/stop", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn stop_instance(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    Ok(Json(claw.stop(&found).await?))
}

/// `POST /api/claw/instances/{id}/restart`: restarts a running runtime with a rebuilt env.
#[utoipa::path(post, path = "/api/claw/instances/{id}/restart", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restart_instance(
    State(s): State<AppState>,
    RequireRole(scope, _): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    Ok(Json(claw.restart(&found).await?))
}

/// `POST /api/claw/instances/{id}/access-code`: a 10-minute, single-use access code for the
/// caller (their previous one expires), and the access gateway path to redeem it at.
#[utoipa::path(post, path = "/api/claw/instances/{id}/access-code", tag = "claw",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AccessCodeView), (status = 404, body = ErrorBody)))]
pub async fn issue_access_code(
    State(s): State<AppState>,
    // Personal: redeeming the code mints a 24-hour user JWT (the access cookie).
    PersonalRole(scope, _): PersonalRole<Member>,
    Path(id): Path<String>,
) -> Result<Json<AccessCodeView>, ApiError> {
    let (claw, found) = found(&s, scope.owner(), &id).await?;
    let user = scope.auth.principal.user;
    let (code, expires_at) = claw.issue_access_code(user).await?;
    let shown = kilocloud_claw::crypto::display_access_code(&code);
    Ok(Json(AccessCodeView {
        path: format!(
            "/kilo-access-gateway?instance={}&user={user}&code={shown}",
            found.row.id
        ),
        code: shown,
        expires_at,
    }))
}

// ----- platform routes -----

/// Which instance a platform call is about: `instanceId`, else the user's legacy instance.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct PlatformTarget {
    /// The user.
    pub user_id: Uuid,
    /// The instance; absent: the user's legacy per-user instance.
    pub instance_id: Option<Uuid>,
}

async fn platform_found(s: &AppState, t: &PlatformTarget) -> Result<(Claw, InstanceRef), ApiError> {
    let claw = claw(s)?.clone();
    let found = match t.instance_id {
        Some(id) => claw.find_for_user(t.user_id, id).await?,
        None => claw.find(Owner::User(t.user_id), t.user_id).await?,
    };
    Ok((claw, found))
}

/// The audit initiator of a platform call: the user it is made for.
fn platform_initiator(user: Uuid) -> Initiator {
    Initiator {
        user,
        request_id: None,
    }
}

/// `POST /api/platform/provision` body: the target, the owning organization (the user must
/// be a member), and the configuration.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformProvision {
    /// The user.
    pub user_id: Uuid,
    /// The instance id to create or re-provision; absent: the legacy per-user instance.
    pub instance_id: Option<Uuid>,
    /// Organization owning the instance.
    pub organization_id: Option<Uuid>,
    /// Configuration.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub config: CreateInstance,
}

/// `POST /api/platform/provision`: creates (201) or re-provisions the instance; `start`
/// defaults to false here. 201 `{instanceId, sandboxId}`.
#[utoipa::path(post, path = "/api/platform/provision", tag = "claw",
    security(("internal" = [])), request_body = PlatformProvision,
    responses((status = 201, body = Object), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn platform_provision(
    State(s): State<AppState>,
    _: Internal,
    Json(mut body): Json<PlatformProvision>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let claw = claw(&s)?;
    body.config.start = Some(body.config.start.unwrap_or(false));
    let by = platform_initiator(body.user_id);
    let owner = match body.organization_id {
        Some(org) => {
            if s.identity.org_role(org, body.user_id).await?.is_none() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "not_a_member",
                    "the user is not a member of that organization",
                ));
            }
            Owner::Org(org)
        }
        None => Owner::User(body.user_id),
    };
    let view = match body.instance_id {
        None => {
            claw.provision_legacy(body.user_id, body.config, &by)
                .await?
        }
        Some(id) => {
            claw.provision_instance(owner, body.user_id, id, body.config, &by)
                .await?
        }
    };
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"instanceId": view.id, "sandboxId": view.sandbox_id})),
    ))
}

/// `POST /api/platform/{start|stop|destroy|doctor}` body.
pub type PlatformBody = PlatformTarget;

/// `POST /api/platform/start`.
#[utoipa::path(post, path = "/api/platform/start", tag = "claw",
    security(("internal" = [])), request_body = PlatformTarget,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_start(
    State(s): State<AppState>,
    _: Internal,
    Json(t): Json<PlatformBody>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    Ok(Json(claw.start(&found).await?))
}

/// `POST /api/platform/stop`.
#[utoipa::path(post, path = "/api/platform/stop", tag = "claw",
    security(("internal" = [])), request_body = PlatformTarget,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_stop(
    State(s): State<AppState>,
    _: Internal,
    Json(t): Json<PlatformBody>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    Ok(Json(claw.stop(&found).await?))
}

/// `POST /api/platform/destroy`: `{complete}` as for the user route.
#[utoipa::path(post, path = "/api/platform/destroy", tag = "claw",
    security(("internal" = [])), request_body = PlatformTarget,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_destroy(
    State(s): State<AppState>,
    _: Internal,
    Json(t): Json<PlatformBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    let complete = claw.destroy(&found).await?;
    Ok(Json(serde_json::json!({"complete": complete})))
}

/// `POST /api/platform/doctor`: runs the runtime's doctor (60 s at most); `{exitCode,
/// stdout, stderr}`.
#[utoipa::path(post, path = "/api/platform/doctor", tag = "claw",
    security(("internal" = [])), request_body = PlatformTarget,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn platform_doctor(
    State(s): State<AppState>,
    _: Internal,
    Json(t): Json<PlatformBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    let ExecOutput {
        exit_code,
        stdout,
        stderr,
    } = claw.doctor(&found).await?;
    Ok(Json(
        serde_json::json!({"exitCode": exit_code, "stdout": stdout, "stderr": stderr}),
    ))
}

/// `GET /api/platform/status?userId&instanceId`.
#[utoipa::path(get, path = "/api/platform/status", tag = "claw",
    security(("internal" = [])), params(PlatformTarget),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_status(
    State(s): State<AppState>,
    _: Internal,
    Query(t): Query<PlatformTarget>,
) -> Result<Json<InstanceView>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    Ok(Json(claw.view(&found).await?))
}

/// `GET /api/platform/gateway-token?userId&instanceId`: `{gatewayToken}` (derived: hex
/// HMAC-SHA256 of the sandbox id), so a dashboard never holds the secret.
#[utoipa::path(get, path = "/api/platform/gateway-token", tag = "claw",
    security(("internal" = [])), params(PlatformTarget),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_gateway_token(
    State(s): State<AppState>,
    _: Internal,
    Query(t): Query<PlatformTarget>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (claw, found) = platform_found(&s, &t).await?;
    let token = claw.gateway_token(&found.row.sandbox_id);
    Ok(Json(serde_json::json!({"gatewayToken": token})))
}

/// Deserializes a field a PATCH may set (`"v"`), clear (`null`) or leave alone (absent:
/// `None` through `#[serde(default)]`).
fn double<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// `PATCH /api/platform/kilocode-config` body: absent fields are left alone, `null` clears.
/// No `Debug`: it carries a key in plaintext.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KilocodeConfigPatch {
    /// The user.
    pub user_id: Uuid,
    /// The instance; absent: the legacy instance.
    pub instance_id: Option<Uuid>,
    /// The runtime's model-gateway key.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub kilocode_api_key: Option<Option<String>>,
    /// Its expiry, ms since epoch.
    pub kilocode_api_key_expires_at: Option<i64>,
    /// Default model, `kilocode/<provider>/<model>`.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub kilocode_default_model: Option<Option<String>>,
    /// Models offered.
    #[schema(value_type = Option<Vec<Object>>)]
    pub kilocode_models: Option<Vec<ModelEntry>>,
}

/// `PATCH /api/platform/kilocode-config`: the runtime's key and model settings (applied at
/// the next start or restart).
#[utoipa::path(patch, path = "/api/platform/kilocode-config", tag = "claw",
    security(("internal" = [])), request_body = KilocodeConfigPatch,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn platform_kilocode_config(
    State(s): State<AppState>,
    _: Internal,
    Json(body): Json<KilocodeConfigPatch>,
) -> Result<Json<InstanceView>, ApiError> {
    let target = PlatformTarget {
        user_id: body.user_id,
        instance_id: body.instance_id,
    };
    let (claw, found) = platform_found(&s, &target).await?;
    if let Some(Some(model)) = &body.kilocode_default_model {
        kilocloud_claw::check_model(model)?;
    }
    let sandbox = &found.row.sandbox_id;
    let patch = ConfigPatch {
        kilocode_api_key: body.kilocode_api_key.map(|k| {
            k.map(|k| {
                (
                    claw.seal(sandbox, "KILOCODE_API_KEY", &k),
                    body.kilocode_api_key_expires_at,
                )
            })
        }),
        kilocode_default_model: body.kilocode_default_model,
        kilocode_models: body.kilocode_models,
        channels: BTreeMap::new(),
    };
    Ok(Json(claw.configure(&found, patch).await?))
}

/// `PATCH /api/platform/channels` body: each token a value or `null` (deleted); absent ones
/// are kept.
/// No `Debug`: it carries tokens in plaintext.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelsPatch {
    /// The user.
    pub user_id: Uuid,
    /// The instance; absent: the legacy instance.
    pub instance_id: Option<Uuid>,
    /// Telegram bot token.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub telegram_bot_token: Option<Option<String>>,
    /// Discord bot token.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub discord_bot_token: Option<Option<String>>,
    /// Slack bot token.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub slack_bot_token: Option<Option<String>>,
    /// Slack app token.
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<String>)]
    pub slack_app_token: Option<Option<String>>,
}

/// `PATCH /api/platform/channels`: merges channel tokens (sealed at once; applied at the
/// next restart).
#[utoipa::path(patch, path = "/api/platform/channels", tag = "claw",
    security(("internal" = [])), request_body = ChannelsPatch,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn platform_channels(
    State(s): State<AppState>,
    _: Internal,
    Json(body): Json<ChannelsPatch>,
) -> Result<Json<InstanceView>, ApiError> {
    let target = PlatformTarget {
        user_id: body.user_id,
        instance_id: body.instance_id,
    };
    let (claw, found) = platform_found(&s, &target).await?;
    let sandbox = &found.row.sandbox_id;
    let mut channels = BTreeMap::new();
    for (name, value) in [
        ("TELEGRAM_BOT_TOKEN", body.telegram_bot_token),
        ("DISCORD_BOT_TOKEN", body.discord_bot_token),
        ("SLACK_BOT_TOKEN", body.slack_bot_token),
        ("SLACK_APP_TOKEN", body.slack_app_token),
    ] {
        if let Some(value) = value {
            channels.insert(name.to_owned(), value.map(|v| claw.seal(sandbox, name, &v)));
        }
    }
    let patch = ConfigPatch {
        channels,
        ..ConfigPatch::default()
    };
    Ok(Json(claw.configure(&found, patch).await?))
}
