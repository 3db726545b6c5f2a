//! Automation routes: the GitHub App webhook and installations, triggers and their inbound
//! webhook (`/hooks/…`), and code review. Owner-scoped like sessions: an organization's with
//! `X-KiloCode-OrganizationId`, where changes need the `admin` role; another owner's trigger
//! or review is 404.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use kilocloud_automation::installations::Installation;
use kilocloud_automation::triggers::{IncomingRequest, MAX_BODY_BYTES};
use kilocloud_automation::webhook::{DeliveryRecord, MAX_WEBHOOK_BYTES, WebhookHeaders};
use kilocloud_automation::{
    Automation, AutomationError, ReviewRecord, ReviewSettings, TriggerConfig, TriggerRequest,
    TriggerSpec,
};
use kilocloud_identity::Owner;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ErrorBody;
use crate::auth::{Admin, OwnerScope, RequireRole, limited_webhook};
use crate::error::read_body;
use crate::{ApiError, AppState, Json};

impl From<AutomationError> for ApiError {
    fn from(e: AutomationError) -> Self {
        let message = e.to_string();
        match e {
            AutomationError::Invalid(_) => ApiError::bad_request(message),
            AutomationError::NotFound(_) => ApiError::not_found(message),
            AutomationError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            AutomationError::Unauthorized(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", message)
            }
            AutomationError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
            }
            AutomationError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            AutomationError::UnsupportedMediaType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                message,
            ),
            AutomationError::TooManyInFlight { .. } => ApiError {
                retry_after_secs: Some(5),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_in_flight", message)
            },
            AutomationError::Disabled(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "github_disabled", message)
            }
            AutomationError::Unavailable(_) => ApiError {
                retry_after_secs: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            },
            AutomationError::GitHub(g) if g.is_transient() => ApiError {
                retry_after_secs: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "github_unavailable",
                    message,
                )
            },
            AutomationError::GitHub(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "github_error", message)
            }
            AutomationError::Agent(e) => e.into(),
            AutomationError::Substrate(e) => e.into(),
        }
    }
}

fn automation(s: &AppState) -> Result<&Automation, ApiError> {
    s.automation.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "automation_disabled",
            "automation is not enabled on this server (it needs the Cloud Agent)",
        )
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `POST /api/github/webhook`: a GitHub App webhook delivery. Verified by
/// `X-Hub-Signature-256` before anything else (401, nothing stored); a delivery id seen in
/// the last 24 h is answered 200 with `duplicate: true` and not processed again; events and
/// actions nobody handles are accepted and recorded as `ignored`.
#[utoipa::path(post, path = "/api/github/webhook", tag = "github",
    request_body(content = String, description = "The event payload (JSON, at most 5 MiB)", content_type = "application/json"),
    params(("X-GitHub-Event" = String, Header), ("X-GitHub-Delivery" = String, Header),
        ("X-Hub-Signature-256" = String, Header, description = "sha256=<hex HMAC-SHA256 of the body>")),
    responses((status = 200, body = DeliveryRecord), (status = 400, body = ErrorBody),
        (status = 401, description = "bad or missing signature", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, description = "no GitHub App configured", body = ErrorBody)))]
pub async fn github_webhook(
    State(s): State<AppState>,
    request: Request,
) -> Result<Json<DeliveryRecord>, ApiError> {
    let automation = automation(&s)?;
    let (parts, body) = request.into_parts();
    let body = read_body(body, MAX_WEBHOOK_BYTES).await?;
    let headers = WebhookHeaders {
        event: header(&parts.headers, "x-github-event"),
        delivery: header(&parts.headers, "x-github-delivery"),
        signature: header(&parts.headers, "x-hub-signature-256"),
    };
    let record = limited_webhook(&parts, &s, async {
        Ok(automation.github_webhook(headers, &body).await?)
    })
    .await?;
    Ok(Json(record))
}

/// Body of `POST /api/github/installations`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimInstallation {
    /// The installation id GitHub gave (the `installation_id` of the app's setup URL).
    pub installation_id: u64,
}

/// `GET /api/github/installations`: the owner's GitHub App installations.
#[utoipa::path(get, path = "/api/github/installations", tag = "github",
    responses((status = 200, body = Vec<Installation>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_installations(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Vec<Installation>>, ApiError> {
    Ok(Json(automation(&s)?.installations(scope.owner()).await?))
}

/// `POST /api/github/installations`: claims an installation of the app for the owner, after
/// checking with GitHub that it exists. Automation for the owner acts as the claiming user.
/// Site administrators only, unless `github.allow_self_claim` is set (403 otherwise).
#[utoipa::path(post, path = "/api/github/installations", tag = "github", request_body = ClaimInstallation,
    responses((status = 201, body = Installation), (status = 403, description = "not a site administrator", body = ErrorBody),
        (status = 404, description = "GitHub does not know it", body = ErrorBody),
        (status = 409, description = "another owner claimed it", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn claim_installation(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Json(body): Json<ClaimInstallation>,
) -> Result<(StatusCode, Json<Installation>), ApiError> {
    let scope = role.scope();
    let record = automation(&s)?
        .claim_installation(
            scope.owner(),
            scope.auth.principal.user,
            scope.auth.principal.is_admin,
            body.installation_id,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

/// `DELETE /api/github/installations/{id}`: gives up an installation.
#[utoipa::path(delete, path = "/api/github/installations/{id}", tag = "github",
    params(("id" = u64, Path, description = "Installation id")),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn release_installation(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    automation(&s)?
        .release_installation(role.scope().owner(), id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A trigger and the path its webhook is posted to.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerView {
    /// The trigger (secrets left out).
    #[serde(flatten)]
    pub trigger: TriggerConfig,
    /// `/hooks/{ownerType}/{ownerId}/{triggerId}` (for a webhook trigger), to append to the
    /// server's URL.
    pub inbound_path: Option<String>,
}

impl From<TriggerConfig> for TriggerView {
    fn from(trigger: TriggerConfig) -> Self {
        let inbound_path = (trigger.activation_type == "webhook").then(|| {
            let (kind, id) = trigger.owner.split_once(':').unwrap_or(("user", ""));
            format!("/hooks/{kind}/{id}/{}", trigger.id)
        });
        Self {
            trigger,
            inbound_path,
        }
    }
}

/// `POST /api/triggers`: creates a trigger.
#[utoipa::path(post, path = "/api/triggers", tag = "triggers", request_body = TriggerSpec,
    responses((status = 201, body = TriggerView), (status = 400, body = ErrorBody),
        (status = 409, description = "the id is taken", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_trigger(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Json(spec): Json<TriggerSpec>,
) -> Result<(StatusCode, Json<TriggerView>), ApiError> {
    let scope = role.scope();
    let trigger = automation(&s)?
        .create_trigger(scope.owner(), scope.auth.principal.user, spec)
        .await?;
    Ok((StatusCode::CREATED, Json(trigger.into())))
}

/// `GET /api/triggers`: the owner's triggers.
#[utoipa::path(get, path = "/api/triggers", tag = "triggers",
    responses((status = 200, body = Vec<TriggerView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_triggers(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Vec<TriggerView>>, ApiError> {
    let all = automation(&s)?.triggers(scope.owner()).await?;
    Ok(Json(all.into_iter().map(Into::into).collect()))
}

/// `GET /api/triggers/{id}`: one trigger.
#[utoipa::path(get, path = "/api/triggers/{id}", tag = "triggers",
    params(("id" = String, Path, description = "Trigger id")),
    responses((status = 200, body = TriggerView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_trigger(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<TriggerView>, ApiError> {
    Ok(Json(
        automation(&s)?.trigger(scope.owner(), &id).await?.into(),
    ))
}

/// `PUT /api/triggers/{id}`: replaces a trigger's configuration (the body's `id` is ignored).
#[utoipa::path(put, path = "/api/triggers/{id}", tag = "triggers", request_body = TriggerSpec,
    params(("id" = String, Path, description = "Trigger id")),
    responses((status = 200, body = TriggerView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_trigger(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Path(id): Path<String>,
    Json(spec): Json<TriggerSpec>,
) -> Result<Json<TriggerView>, ApiError> {
    let scope = role.scope();
    let trigger = automation(&s)?
        .update_trigger(scope.owner(), scope.auth.principal.user, &id, spec)
        .await?;
    Ok(Json(trigger.into()))
}

/// `DELETE /api/triggers/{id}`: deletes a trigger, its requests and its schedule.
#[utoipa::path(delete, path = "/api/triggers/{id}", tag = "triggers",
    params(("id" = String, Path, description = "Trigger id")),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_trigger(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    automation(&s)?
        .delete_trigger(role.scope().owner(), &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/triggers/{id}/requests`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RequestsQuery {
    /// 1–100, default 50.
    pub limit: Option<usize>,
}

/// `GET /api/triggers/{id}/requests`: the newest requests, newest first.
#[utoipa::path(get, path = "/api/triggers/{id}/requests", tag = "triggers",
    params(("id" = String, Path, description = "Trigger id"), RequestsQuery),
    responses((status = 200, body = Vec<TriggerRequest>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn trigger_requests(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    Query(q): Query<RequestsQuery>,
) -> Result<Json<Vec<TriggerRequest>>, ApiError> {
    let limit = match q.limit.unwrap_or(50) {
        n @ 1..=100 => n,
        _ => return Err(ApiError::bad_request("limit must be 1 to 100")),
    };
    Ok(Json(
        automation(&s)?
            .trigger_requests(scope.owner(), &id, limit)
            .await?,
    ))
}

/// `GET /api/triggers/{id}/requests/{requestId}`: one request.
#[utoipa::path(get, path = "/api/triggers/{id}/requests/{request_id}", tag = "triggers",
    params(("id" = String, Path, description = "Trigger id"), ("request_id" = String, Path, description = "Request id")),
    responses((status = 200, body = TriggerRequest), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn trigger_request(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path((id, request_id)): Path<(String, String)>,
) -> Result<Json<TriggerRequest>, ApiError> {
    Ok(Json(
        automation(&s)?
            .trigger_request(scope.owner(), &id, &request_id)
            .await?,
    ))
}

/// Answer of the inbound webhook.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Captured {
    /// The request's id (see `GET /api/triggers/{id}/requests/{requestId}`).
    pub request_id: String,
    /// A human-readable note.
    pub message: String,
}

/// `POST /hooks/{owner_type}/{owner_id}/{trigger_id}`: fires a webhook trigger. No platform
/// credentials; the trigger's own header secret or HMAC signature when it has one. Text or
/// JSON bodies of at most 256 KiB; 20 requests in flight per trigger.
#[utoipa::path(post, path = "/hooks/{owner_type}/{owner_id}/{trigger_id}", tag = "triggers",
    params(("owner_type" = String, Path, description = "`user` or `org`"), ("owner_id" = Uuid, Path),
        ("trigger_id" = String, Path)),
    request_body(content = String, description = "Any text or JSON body", content_type = "application/json"),
    responses((status = 202, body = Captured), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn inbound(
    State(s): State<AppState>,
    Path((owner_type, owner_id, trigger_id)): Path<(String, String, String)>,
    request: Request,
) -> Result<(StatusCode, Json<Captured>), ApiError> {
    let automation = automation(&s)?;
    let not_found = || ApiError::not_found("trigger not found");
    let owner_id: Uuid = owner_id.parse().map_err(|_| not_found())?;
    let owner = match owner_type.as_str() {
        "user" => Owner::User(owner_id),
        "org" => Owner::Org(owner_id),
        _ => return Err(not_found()),
    };
    let (parts, body) = request.into_parts();
    let source_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let declared = header(&parts.headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|n| *n > MAX_BODY_BYTES) {
        return Err(AutomationError::TooLarge {
            size,
            limit: MAX_BODY_BYTES,
        }
        .into());
    }
    let body = read_body(body, MAX_BODY_BYTES).await?;
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let incoming = IncomingRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers,
        body: body.to_vec(),
        source_ip,
    };
    let request_id = limited_webhook(&parts, &s, async {
        Ok(automation.capture(owner, &trigger_id, incoming).await?)
    })
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Captured {
            request_id,
            message: "captured; the trigger runs shortly".into(),
        }),
    ))
}

/// `GET /api/review/settings`: the owner's code review settings.
#[utoipa::path(get, path = "/api/review/settings", tag = "review",
    responses((status = 200, body = ReviewSettings), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_review_settings(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<ReviewSettings>, ApiError> {
    Ok(Json(automation(&s)?.review_settings(scope.owner()).await?))
}

/// `PUT /api/review/settings`: replaces the owner's code review settings.
#[utoipa::path(put, path = "/api/review/settings", tag = "review", request_body = ReviewSettings,
    responses((status = 200, body = ReviewSettings), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_review_settings(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Json(settings): Json<ReviewSettings>,
) -> Result<Json<ReviewSettings>, ApiError> {
    Ok(Json(
        automation(&s)?
            .put_review_settings(role.scope().owner(), settings)
            .await?,
    ))
}

/// `GET /api/reviews`: the owner's reviews of the last 7 days, newest first.
#[utoipa::path(get, path = "/api/reviews", tag = "review",
    responses((status = 200, body = Vec<ReviewRecord>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_reviews(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Vec<ReviewRecord>>, ApiError> {
    Ok(Json(automation(&s)?.reviews(scope.owner()).await?))
}

/// `GET /api/reviews/{id}`: one review.
#[utoipa::path(get, path = "/api/reviews/{id}", tag = "review",
    params(("id" = String, Path, description = "Review id")),
    responses((status = 200, body = ReviewRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_review(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<ReviewRecord>, ApiError> {
    automation(&s)?
        .review(scope.owner(), &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("review not found"))
}
