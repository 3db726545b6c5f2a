//! `/api/orgs`: organizations, their members and their audit log. Routes with `{id}` answer
//! 404 to callers who are not members ([`OrgAccess`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use kilocloud_identity::Role;
use kilocloud_identity::model::{MemberView, OrgMembershipView, OrgView};
use kilocloud_identity::owner::parse_uuid;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AuditPage, AuditQuery, ErrorBody};
use crate::auth::{Admin, Member, OrgAccess, OwnerRole, PersonalAuth};
use crate::error::Query;
use crate::{ApiError, AppState, Json};

/// Body of `POST /api/orgs` and `PATCH /api/orgs/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgName {
    /// Display name, 1–100 characters.
    pub name: String,
}

/// `POST /api/orgs`: creates an organization with the caller as its owner.
#[utoipa::path(post, path = "/api/orgs", tag = "organizations", request_body = OrgName,
    responses((status = 201, body = OrgView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_org(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
    Json(body): Json<OrgName>,
) -> Result<(StatusCode, Json<OrgView>), ApiError> {
    let org = s.identity.create_org(&body.name, &auth.initiator()).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// The caller's organizations.
#[derive(Serialize, ToSchema)]
pub struct OrgList {
    /// Organizations with the caller's role, by name.
    pub organizations: Vec<OrgMembershipView>,
}

/// `GET /api/orgs`: the organizations the caller belongs to.
#[utoipa::path(get, path = "/api/orgs", tag = "organizations",
    responses((status = 200, body = OrgList), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_orgs(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
) -> Result<Json<OrgList>, ApiError> {
    Ok(Json(OrgList {
        organizations: s.identity.orgs_of(auth.principal.user).await?,
    }))
}

/// `GET /api/orgs/{id}` (members).
#[utoipa::path(get, path = "/api/orgs/{id}", tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    responses((status = 200, body = OrgMembershipView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_org(
    State(s): State<AppState>,
    access: OrgAccess<Member>,
) -> Result<Json<OrgMembershipView>, ApiError> {
    let org = s
        .identity
        .org(access.org)
        .await?
        .ok_or_else(|| ApiError::not_found("organization not found"))?;
    Ok(Json(OrgMembershipView {
        org,
        role: access.role,
    }))
}

/// `PATCH /api/orgs/{id}` (admins): renames it.
#[utoipa::path(patch, path = "/api/orgs/{id}", tag = "organizations", request_body = OrgName,
    params(("id" = Uuid, Path, description = "Organization id")),
    responses((status = 200, body = OrgView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rename_org(
    State(s): State<AppState>,
    access: OrgAccess<Admin>,
    Json(body): Json<OrgName>,
) -> Result<Json<OrgView>, ApiError> {
    Ok(Json(
        s.identity
            .rename_org(access.org, &body.name, &access.auth.initiator())
            .await?,
    ))
}

/// `DELETE /api/orgs/{id}` (owners): deletes it with its keys, secrets, bots and audit log.
#[utoipa::path(delete, path = "/api/orgs/{id}", tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_org(
    State(s): State<AppState>,
    access: OrgAccess<OwnerRole>,
) -> Result<StatusCode, ApiError> {
    s.identity
        .delete_org(access.org, &access.auth.initiator())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Members of an organization.
#[derive(Serialize, ToSchema)]
pub struct MemberList {
    /// The members.
    pub members: Vec<MemberView>,
}

/// `GET /api/orgs/{id}/members` (members).
#[utoipa::path(get, path = "/api/orgs/{id}/members", tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    responses((status = 200, body = MemberList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_members(
    State(s): State<AppState>,
    access: OrgAccess<Member>,
) -> Result<Json<MemberList>, ApiError> {
    Ok(Json(MemberList {
        members: s.identity.members(access.org).await?,
    }))
}

/// Body of `PUT /api/orgs/{id}/members/{user}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRole {
    /// `member`, `admin` or `owner`.
    pub role: Role,
}

async fn resolve_user(s: &AppState, user: &str) -> Result<Uuid, ApiError> {
    let found = match parse_uuid(user) {
        Some(id) => s.identity.user(id).await?,
        None => s.identity.user_by_email(user).await?,
    };
    found
        .map(|u| u.id)
        .ok_or_else(|| ApiError::not_found("user not found"))
}

/// `PUT /api/orgs/{id}/members/{user}` (admins; owners for the owner role): adds a member or
/// changes their role. `{user}` is a user id or an email.
#[utoipa::path(put, path = "/api/orgs/{id}/members/{user}", tag = "organizations", request_body = MemberRole,
    params(("id" = Uuid, Path, description = "Organization id"), ("user" = String, Path, description = "User id or email")),
    responses((status = 200, body = MemberView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_member(
    State(s): State<AppState>,
    access: OrgAccess<Admin>,
    Path((_, user)): Path<(String, String)>,
    Json(body): Json<MemberRole>,
) -> Result<Json<MemberView>, ApiError> {
    let user = resolve_user(&s, &user).await?;
    Ok(Json(
        s.identity
            .put_member(access.org, user, body.role, &access.auth.initiator())
            .await?,
    ))
}

/// `DELETE /api/orgs/{id}/members/{user}`: removes a member (admins; owners for owners); any
/// member may remove themself. The last owner cannot leave.
#[utoipa::path(delete, path = "/api/orgs/{id}/members/{user}", tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id"), ("user" = String, Path, description = "User id or email")),
    responses((status = 204, description = "Removed"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(s): State<AppState>,
    access: OrgAccess<Member>,
    Path((_, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let user = resolve_user(&s, &user).await?;
    s.identity
        .remove_member(access.org, user, &access.auth.initiator())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/orgs/{id}/audit` (admins): the organization's audit log, newest first.
#[utoipa::path(get, path = "/api/orgs/{id}/audit", tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id"), AuditQuery),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn org_audit(
    State(s): State<AppState>,
    access: OrgAccess<Admin>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let entries = s
        .identity
        .audit(
            kilocloud_identity::Owner::Org(access.org),
            q.before,
            q.limit()?,
        )
        .await?;
    Ok(Json(AuditPage { entries }))
}
