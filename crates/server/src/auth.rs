//! Authentication and authorization as extractors: a handler's signature states what it
//! requires, and a route cannot forget the check (STYLE.md, "axum: cross-cutting concerns as
//! types").
//!
//! | extractor | requires | fails with |
//! |---|---|---|
//! | [`AuthUser`] | a valid JWT or API key in `Authorization: Bearer` | 401 (429 when rate limited) |
//! | [`PersonalAuth`] | `AuthUser` with a personal credential (not an org's key, not org-pinned, not a bot's) | 403 `personal_credential_required` |
//! | [`PersonalRole<R>`] | `RequireRole<R>` with a personal credential (minting keys and JWTs) | 403 |
//! | [`OwnerScope`] | `AuthUser`, and membership of the org in `X-KiloCode-OrganizationId` | 400 not a UUID, 403 not a member |
//! | [`QueryToken`] | a valid JWT or API key in the query string `?token=` (WebSockets of CLIs); the credential's own owner | 401 (429 when rate limited) |
//! | [`RequireRole<R>`] | `OwnerScope` with at least role `R` (a user over their own things is `owner`) | 403 `insufficient_role` |
//! | [`OrgAccess<R>`] | `AuthUser` who is a member of the org in the path `{id}`, with at least `R` | 404 if not a member, 403 if the role is too low |
//! | [`SiteAdmin`] | `AuthUser` who is a site administrator | 403 `admin_required` |
//! | [`Internal`] | `x-internal-api-key` equal (constant time) to `internal_api_secret` | 401 |
//! | [`GatewayCaller`] | nothing, `Bearer anonymous`, or credentials; a failed non-`kc_` bearer is kept for the route to judge | as `OwnerScope` for `kc_` keys |
//!
//! Failed authentications are counted per client address (IPv4, or IPv6 /64; see
//! [`ClientIp`] for proxies) with a GCRA limiter (governor); once an address has used its
//! burst, its failed attempts answer 429 with `Retry-After` until its next failure is allowed
//! (one per 60/N s). Valid credentials and correctly signed webhooks always pass, so users
//! behind one NAT are not locked out by someone else's mistakes, and requests without
//! credentials are not failures.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::owner::{parse_org_header, parse_uuid};
use kilocloud_identity::{Owner, Principal, Role, Scope};
use uuid::Uuid;

use ipnet::IpNet;

use crate::AppState;
use crate::error::ApiError;

/// Header naming the organization a request acts for (reference §0.1; any case).
pub const ORG_HEADER: &str = "x-kilocode-organizationid";
/// Header carrying the internal service secret (reference §0.2).
pub const INTERNAL_KEY_HEADER: &str = "x-internal-api-key";

/// Per-IP budget of failed authentications: a burst of `per_minute`, refilled at `per_minute`
/// per minute. Blocked IPs are remembered until their budget refills.
pub struct AuthFailureLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl AuthFailureLimiter {
    /// A limiter allowing `per_minute` failures per minute per IP (at least 1).
    pub fn new(per_minute: u32) -> Self {
        let n = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `ip` may try again, if it is blocked now.
    fn blocked_for(&self, ip: IpAddr) -> Option<u64> {
        let mut blocked = self.blocked.lock().expect("limiter lock");
        let until = *blocked.get(&ip)?;
        let now = Instant::now();
        if until <= now {
            blocked.remove(&ip);
            return None;
        }
        Some((until - now).as_secs().max(1))
    }

    /// Counts a failure from `ip`; returns the seconds to wait when this failure exhausted the
    /// budget.
    fn record_failure(&self, ip: IpAddr) -> Option<u64> {
        let not_until = self.limiter.check_key(&ip).err()?;
        let wait = not_until.wait_time_from(self.limiter.clock().now());
        let wait = wait.max(Duration::from_secs(1));
        let mut blocked = self.blocked.lock().expect("limiter lock");
        let now = Instant::now();
        if blocked.len() > 10_000 || self.limiter.len() > 100_000 {
            blocked.retain(|_, until| *until > now);
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        blocked.insert(ip, now + wait);
        Some(wait.as_secs().max(1))
    }
}

fn too_many(secs: u64) -> ApiError {
    ApiError {
        retry_after_secs: Some(secs),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_auth_failures",
            "too many failed authentications from this address; retry later",
        )
    }
}

/// The client's address: the TCP peer's, or, when the peer is one of `trusted_proxies`, the
/// address the proxies name: RFC 7239 `Forwarded: for=…`, else `X-Forwarded-For`, read from
/// the right and skipping trusted proxies (the leftmost entries are the client's to forge).
/// Limits count it per IPv4 address or IPv6 /64 (one host usually holds a whole /64).
fn client_ip(parts: &Parts, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(&canonical(*ip)));
    let mut ip = canonical(peer);
    if trusted(&ip) {
        let hops = forwarded_for(&parts.headers);
        // From the nearest hop back: the first address not of a trusted proxy is the client;
        // when every hop is trusted, the farthest.
        if let Some(client) = hops
            .iter()
            .rev()
            .find(|hop| !trusted(hop))
            .or_else(|| hops.first())
        {
            ip = canonical(*client);
        }
    }
    match ip {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        v4 => v4,
    }
}

/// An IPv4-mapped IPv6 address as IPv4; any other as is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The hops a request went through as proxies recorded them, client first: the `for=`
/// parameters of every `Forwarded` header (RFC 7239 §4–6: `for=192.0.2.60`,
/// `for="[2001:db8::1]:4711"`), or, without one, every `X-Forwarded-For` entry. Entries that
/// are not addresses (`unknown`, obfuscated identifiers) are left out.
fn forwarded_for(headers: &http::HeaderMap) -> Vec<IpAddr> {
    fn address(raw: &str) -> Option<IpAddr> {
        let v = raw.trim().trim_matches('"');
        if let Ok(ip) = v.parse::<IpAddr>() {
            return Some(ip);
        }
        if let Ok(sock) = v.parse::<SocketAddr>() {
            return Some(sock.ip());
        }
        // `[v6]` without a port.
        v.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
    }
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>()
    };
    let forwarded: Vec<IpAddr> = values(http::header::FORWARDED)
        .into_iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then(|| address(v))?
            })
        })
        .collect();
    if !forwarded.is_empty() || headers.contains_key(http::header::FORWARDED) {
        return forwarded;
    }
    values(http::header::HeaderName::from_static("x-forwarded-for"))
        .into_iter()
        .filter_map(address)
        .collect()
}

/// The request id (the caller's `x-request-id` or a generated UUID), at most 128 characters, as
/// recorded in the audit log.
fn request_id(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|id| id.chars().take(128).collect())
}

/// Counts a failed authentication from `ip` and returns what to answer: `error`, or 429 once
/// the address has used its budget (or is still blocked).
fn failed(state: &AppState, ip: IpAddr, error: ApiError) -> ApiError {
    metrics::counter!("kilocloud_auth_failures_total", "code" => error.code).increment(1);
    if let Some(secs) = state.auth_limiter.blocked_for(ip) {
        return too_many(secs);
    }
    match state.auth_limiter.record_failure(ip) {
        Some(secs) => too_many(secs),
        None => error,
    }
}

/// Runs an authentication check under the failure limiter: a valid credential passes even
/// from a blocked address; a wrong one counts (see [`failed`]); none at all does not.
async fn limited<T, F>(parts: &Parts, state: &AppState, check: F) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, kilocloud_identity::Error>>,
{
    use kilocloud_identity::credential::AuthError;
    match check.await {
        Ok(v) => Ok(v),
        Err(kilocloud_identity::Error::Auth(AuthError::Missing)) => Err(ApiError::from(
            kilocloud_identity::Error::Auth(AuthError::Missing),
        )),
        Err(kilocloud_identity::Error::Auth(e)) => Err(failed(
            state,
            client_ip(parts, &state.trusted_proxies),
            ApiError::from(kilocloud_identity::Error::Auth(e)),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Runs a webhook's own authentication (a signature or shared secret the service checks)
/// under the per-IP failure limiter of credentials: a correctly signed delivery passes even
/// from a blocked address; a 401 from the check counts as a failure (429 once the address has
/// used its budget).
pub async fn limited_webhook<T, F>(parts: &Parts, state: &AppState, check: F) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, ApiError>>,
{
    match check.await {
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            Err(failed(state, client_ip(parts, &state.trusted_proxies), e))
        }
        other => other,
    }
}

/// An authenticated caller (user JWT or API key, `Authorization: Bearer …`).
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// Who is calling.
    pub principal: Principal,
    /// The request id, for the audit log.
    pub request_id: Option<String>,
}

impl AuthUser {
    /// The caller as the initiator of a change (audit log).
    pub fn initiator(&self) -> Initiator {
        Initiator {
            user: self.principal.user,
            request_id: self.request_id.clone(),
        }
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let bearer = bearer_token(&parts.headers);
        let principal = limited(parts, state, async {
            match bearer {
                None => Err(kilocloud_identity::credential::AuthError::Missing.into()),
                Some(token) => state.identity.authenticate(token).await,
            }
        })
        .await?;
        Ok(AuthUser {
            principal,
            request_id: request_id(parts),
        })
    }
}

/// The caller's address as failures and free-model limits count it (see [`client_ip`]:
/// forwarding headers count only from `server.trusted_proxies`).
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(parts, &state.trusted_proxies)))
    }
}

/// Who calls a gateway route. The credential may be `Authorization: Bearer …` or, for the
/// Anthropic SDK, `x-api-key`.
pub enum GatewayCaller {
    /// No credential, or the literal `anonymous` (the Kilo CLI's token without a login).
    Anonymous,
    /// A valid credential, with the owner it acts for.
    Signed(OwnerScope),
    /// A bearer that is not a `kc_` key and did not authenticate: SDKs always send some key
    /// (`sk-…`, a placeholder), so a free model serves it anonymously, as the reference does
    /// (§1 step 5); any other model refuses it with [`Unverified::refuse`].
    Unverified(Unverified),
}

/// A failed non-`kc_` credential, not yet counted as a failure.
pub struct Unverified {
    error: ApiError,
    ip: IpAddr,
}

impl Unverified {
    /// The error to answer, the failure counted against the caller's address.
    pub fn refuse(self, state: &AppState) -> ApiError {
        failed(state, self.ip, self.error)
    }
}

impl FromRequestParts<AppState> for GatewayCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !parts.headers.contains_key(http::header::AUTHORIZATION)
            && let Some(key) = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok())
            && let Ok(bearer) = http::HeaderValue::from_str(&format!("Bearer {key}"))
        {
            parts.headers.insert(http::header::AUTHORIZATION, bearer);
        }
        let token = match bearer_token(&parts.headers) {
            None | Some("anonymous") => return Ok(GatewayCaller::Anonymous),
            Some(t) => t.to_owned(),
        };
        if token.starts_with(kilocloud_identity::credential::API_KEY_PREFIX) {
            return Ok(GatewayCaller::Signed(
                OwnerScope::from_request_parts(parts, state).await?,
            ));
        }
        match state.identity.authenticate(&token).await {
            Ok(principal) => Ok(GatewayCaller::Signed(
                OwnerScope::for_principal(parts, state, principal).await?,
            )),
            Err(kilocloud_identity::Error::Auth(e)) => Ok(GatewayCaller::Unverified(Unverified {
                error: ApiError::from(kilocloud_identity::Error::Auth(e)),
                ip: client_ip(parts, &state.trusted_proxies),
            })),
            Err(e) => Err(e.into()),
        }
    }
}

/// An [`AuthUser`] whose credential is personal ([`Principal::is_personal`]): for routes on the
/// user's own account (pepper, organizations, tickets, audit log), which an organization's API
/// key, an org-pinned JWT or a bot's JWT must not reach.
pub struct PersonalAuth(pub AuthUser);

impl FromRequestParts<AppState> for PersonalAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        require_personal(&auth)?;
        Ok(PersonalAuth(auth))
    }
}

/// The token of an `Authorization: Bearer …` header: `None` without the header, `Some("")`
/// when it has another scheme or is not text (so it fails as an invalid credential).
pub(crate) fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(http::header::AUTHORIZATION).map(bearer_value)
}

/// The token of one `Authorization` value (`Bearer <token>`), `""` for another scheme.
pub(crate) fn bearer_value(value: &http::HeaderValue) -> &str {
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("")
}

fn require_personal(auth: &AuthUser) -> Result<(), ApiError> {
    if auth.principal.is_personal() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "personal_credential_required",
        "this route acts on a user's own account or mints credentials; use the user's own API \
         key or token, not one of an organization or a bot",
    ))
}

/// [`RequireRole<R>`] with a personal credential ([`PersonalAuth`]): for minting credentials
/// for the owner acted for, which a pinned or bot credential must not do (it would outlive or
/// out-reach itself).
pub struct PersonalRole<R: MinRole>(pub OwnerScope, pub PhantomData<R>);

impl<R: MinRole> FromRequestParts<AppState> for PersonalRole<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let RequireRole(scope, _) = RequireRole::<R>::from_request_parts(parts, state).await?;
        require_personal(&scope.auth)?;
        Ok(PersonalRole(scope, PhantomData))
    }
}

/// The owner a request acts for: the organization named by `X-KiloCode-OrganizationId` (or
/// pinned by the credential), else the caller; with the caller's role over it.
#[derive(Debug, Clone)]
pub struct OwnerScope {
    /// The caller.
    pub auth: AuthUser,
    /// The owner and the caller's role.
    pub scope: Scope,
}

impl OwnerScope {
    /// The owner acted for.
    pub fn owner(&self) -> Owner {
        self.scope.owner
    }
}

impl FromRequestParts<AppState> for OwnerScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        Self::for_user(parts, state, auth).await
    }
}

impl OwnerScope {
    /// The scope of `principal` (already authenticated) for the organization the request
    /// names.
    async fn for_principal(
        parts: &Parts,
        state: &AppState,
        principal: Principal,
    ) -> Result<Self, ApiError> {
        let auth = AuthUser {
            principal,
            request_id: request_id(parts),
        };
        Self::for_user(parts, state, auth).await
    }

    async fn for_user(parts: &Parts, state: &AppState, auth: AuthUser) -> Result<Self, ApiError> {
        let header = match parts.headers.get(ORG_HEADER) {
            None => None,
            Some(v) => parse_org_header(v.as_bytes()).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_organization_id",
                    e.to_string(),
                )
            })?,
        };
        let scope = state.identity.scope(&auth.principal, header).await?;
        Ok(OwnerScope { auth, scope })
    }
}

/// The owner a WebSocket acts for when its credential comes in the query string
/// (`?token=<JWT or kc_ key>`, as `kilo remote` sends it, contract §5): the credential's
/// own owner (the organization it is pinned to, else its user), checked under the same
/// failure limiter as a bearer.
///
/// Rejections: 401 `unauthenticated` without a token, the credential's 401 codes, 429
/// `too_many_auth_failures`.
pub struct QueryToken(pub OwnerScope);

impl FromRequestParts<AppState> for QueryToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        let principal = limited(parts, state, async {
            match token.as_deref() {
                None | Some("") => Err(kilocloud_identity::credential::AuthError::Missing.into()),
                Some(token) => state.identity.authenticate(token).await,
            }
        })
        .await?;
        let auth = AuthUser {
            principal,
            request_id: request_id(parts),
        };
        let scope = state.identity.scope(&auth.principal, None).await?;
        Ok(QueryToken(OwnerScope { auth, scope }))
    }
}

/// A minimum role, as a type: [`Member`], [`Admin`], [`OwnerRole`].
pub trait MinRole: Send + Sync + 'static {
    /// The role.
    const ROLE: Role;
}

/// At least `member`.
pub struct Member;
/// At least `admin`.
pub struct Admin;
/// `owner`.
pub struct OwnerRole;

impl MinRole for Member {
    const ROLE: Role = Role::Member;
}
impl MinRole for Admin {
    const ROLE: Role = Role::Admin;
}
impl MinRole for OwnerRole {
    const ROLE: Role = Role::Owner;
}

fn check_role(have: Role, need: Role) -> Result<(), ApiError> {
    if have >= need {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_role",
            format!("this needs the {need} role in the organization; you are {have}"),
        ))
    }
}

/// [`OwnerScope`] with at least role `R`.
pub struct RequireRole<R: MinRole>(pub OwnerScope, pub PhantomData<R>);

impl<R: MinRole> RequireRole<R> {
    /// The scope.
    pub fn scope(&self) -> &OwnerScope {
        &self.0
    }
}

impl<R: MinRole> FromRequestParts<AppState> for RequireRole<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let scope = OwnerScope::from_request_parts(parts, state).await?;
        check_role(scope.scope.role, R::ROLE)?;
        Ok(RequireRole(scope, PhantomData))
    }
}

/// A member of the organization in the path parameter `{id}` with at least role `R`. A caller
/// who is not a member gets 404, as for an organization that does not exist.
pub struct OrgAccess<R: MinRole> {
    /// The caller.
    pub auth: AuthUser,
    /// The organization.
    pub org: Uuid,
    /// The caller's role in it.
    pub role: Role,
    _min: PhantomData<R>,
}

impl<R: MinRole> FromRequestParts<AppState> for OrgAccess<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("organization not found"))?;
        let org = params
            .get("id")
            .and_then(|id| parse_uuid(id))
            .ok_or_else(|| ApiError::not_found("organization not found"))?;
        if auth.principal.pinned_org.is_some_and(|p| p != org) {
            return Err(ApiError::not_found("organization not found"));
        }
        let role = state
            .identity
            .org_role(org, auth.principal.user)
            .await?
            .ok_or_else(|| ApiError::not_found("organization not found"))?;
        check_role(role, R::ROLE)?;
        Ok(OrgAccess {
            auth,
            org,
            role,
            _min: PhantomData,
        })
    }
}

/// An authenticated site administrator.
pub struct SiteAdmin(pub AuthUser);

impl FromRequestParts<AppState> for SiteAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        if !auth.principal.is_admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_required",
                "this needs a site administrator",
            ));
        }
        Ok(SiteAdmin(auth))
    }
}

/// A platform-to-platform call carrying the internal service secret.
pub struct Internal;

impl FromRequestParts<AppState> for Internal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(INTERNAL_KEY_HEADER)
            .map(|v| v.as_bytes().to_vec());
        limited(parts, state, async {
            state.identity.verify_internal_key(presented.as_deref())
        })
        .await?;
        Ok(Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_from(peer: &str) -> Parts {
        let mut req = http::Request::new(());
        let addr: SocketAddr = peer.parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
        req.into_parts().0
    }

    fn with_header(mut parts: Parts, name: &'static str, value: &str) -> Parts {
        parts
            .headers
            .append(name, http::HeaderValue::from_str(value).unwrap());
        parts
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let via_proxy = |name, value| with_header(parts_from("10.1.2.3:80"), name, value);
        // Not from a trusted proxy: the header is the client's own claim, ignored.
        let forged = with_header(
            parts_from("203.0.113.9:1"),
            "x-forwarded-for",
            "198.51.100.1",
        );
        assert_eq!(client_ip(&forged, &trusted), addr("203.0.113.9"));
        assert_eq!(
            client_ip(&via_proxy("x-forwarded-for", "198.51.100.1"), &[]),
            addr("10.1.2.3"),
            "no trusted proxies: the peer"
        );
        // The rightmost untrusted hop; what the client put on the left is not believed.
        let chain = via_proxy("x-forwarded-for", "192.0.2.66, 198.51.100.1, 10.9.9.9");
        assert_eq!(client_ip(&chain, &trusted), addr("198.51.100.1"));
        let rfc = via_proxy(
            "forwarded",
            r#"for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711""#,
        );
        assert_eq!(
            client_ip(&rfc, &trusted),
            client_ip(&parts_from("[2001:db8:cafe::1]:1"), &[]),
            "Forwarded wins; IPv6 counts per /64"
        );
        let both = with_header(
            via_proxy("forwarded", "for=198.51.100.7"),
            "x-forwarded-for",
            "192.0.2.1",
        );
        assert_eq!(client_ip(&both, &trusted), addr("198.51.100.7"));
        let unknown = via_proxy("forwarded", "for=unknown");
        assert_eq!(client_ip(&unknown, &trusted), addr("10.1.2.3"));
    }

    #[test]
    fn failures_count_per_ipv4_address_and_ipv6_prefix() {
        let ip = |peer| client_ip(&parts_from(peer), &[]);
        assert_eq!(ip("192.0.2.7:1"), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            ip("[2001:db8:1:2:aaaa::1]:1"),
            ip("[2001:db8:1:2:bbbb::9]:2")
        );
        assert_ne!(ip("[2001:db8:1:2::1]:1"), ip("[2001:db8:1:3::1]:1"));
        assert_eq!(ip("[::ffff:192.0.2.7]:1"), ip("192.0.2.7:5"));
    }
}
