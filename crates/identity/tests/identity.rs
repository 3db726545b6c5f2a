//! The identity service on SQLite and PostgreSQL with a manual clock: credentials (pepper
//! revocation, expiry, API keys, tickets), membership rules, secrets and master-key rotation,
//! the audit log and bootstrap.

use std::sync::Arc;

use kilocloud_identity::credential::{AuthError, TokenClaims, TokenSigner};
use kilocloud_identity::envelope::{CryptoError, MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Credential, Error, Identity, IdentityConfig, Owner, Role, TICKET_TTL_MS};
use kilocloud_substrate::{ManualClock, Substrate};
use kilocloud_test_support::TestStore;
use uuid::Uuid;

/// 2027-01-01T00:00:00Z.
const T0: i64 = 1_798_761_600_000;
const JWT_SECRET: &[u8] = b"identity-test-jwt-secret";

struct Env {
    _store: TestStore,
    sub: Substrate,
    clock: Arc<ManualClock>,
    id: Identity,
}

impl Env {
    async fn new(postgres: bool) -> Self {
        Self::with_key(postgres, MasterKey::generate().0).await
    }

    async fn with_key(postgres: bool, key: MasterKey) -> Self {
        let store = TestStore::new(postgres).await;
        let clock = Arc::new(ManualClock::new(T0));
        let sub = store.open(clock.clone()).await;
        let id = identity(&sub, MasterKeys::new(key, vec![]));
        Env {
            _store: store,
            sub,
            clock,
            id,
        }
    }

    async fn user(&self, email: &str) -> Uuid {
        self.id
            .create_user(email, email, false, &by(Uuid::nil()))
            .await
            .unwrap()
            .0
            .id
    }
}

fn identity(sub: &Substrate, keys: MasterKeys) -> Identity {
    Identity::new(
        sub,
        IdentityConfig {
            jwt_secret: JWT_SECRET.to_vec(),
            master_keys: keys,
            internal_api_secret: Some("internal".into()),
        },
    )
}

fn by(user: Uuid) -> Initiator {
    Initiator {
        user,
        request_id: Some(format!("req-{user}")),
    }
}

fn auth_err(r: Result<impl std::fmt::Debug, Error>) -> AuthError {
    match r {
        Err(Error::Auth(e)) => e,
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

fn code(r: Result<impl std::fmt::Debug, Error>) -> &'static str {
    match r {
        Err(Error::Forbidden { code, .. } | Error::Conflict { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

kilocloud_test_support::on_both_backends!(
    jwt_expiry_pepper_and_bots,
    api_keys,
    tickets,
    secrets_and_master_key_rotation,
    membership_rules,
    audit_log,
    bootstrap_and_unique_emails,
    internal_key,
);

async fn jwt_expiry_pepper_and_bots(pg: bool) {
    let e = Env::new(pg).await;
    let alice = e.user("alice@example.com").await;
    let (token, exp) =
        e.id.issue_jwt(alice, None, None, 60, &by(alice))
            .await
            .unwrap();
    assert_eq!(exp, T0 / 1000 + 60);
    let p = e.id.authenticate(&token).await.unwrap();
    assert_eq!(
        (p.user, p.credential, p.pinned_org),
        (alice, Credential::Jwt, None)
    );

    e.clock.advance(60_000);
    assert_eq!(
        auth_err(e.id.authenticate(&token).await),
        AuthError::Expired
    );

    let (token, _) =
        e.id.issue_jwt(alice, None, None, 3600, &by(alice))
            .await
            .unwrap();
    e.id.rotate_pepper(alice, &by(alice)).await.unwrap();
    assert_eq!(
        auth_err(e.id.authenticate(&token).await),
        AuthError::Revoked
    );
    let (fresh, _) =
        e.id.issue_jwt(alice, None, None, 3600, &by(alice))
            .await
            .unwrap();
    assert_eq!(e.id.authenticate(&fresh).await.unwrap().user, alice);

    // Strict: a token without a pepper does not match a user who has one.
    let pepperless = |user: Uuid| {
        TokenSigner::new(JWT_SECRET).sign(&TokenClaims {
            kilo_user_id: user.to_string(),
            api_token_pepper: None,
            version: 3,
            exp: T0 / 1000 + 3600,
            iat: T0 / 1000,
            organization_id: None,
            bot_id: None,
        })
    };
    let no_pepper = pepperless(alice);
    assert_eq!(
        auth_err(e.id.authenticate(&no_pepper).await),
        AuthError::Revoked
    );
    // A well-signed token for a user who does not exist is revoked; none is issued for one.
    let ghost = pepperless(Uuid::new_v4());
    assert_eq!(
        auth_err(e.id.authenticate(&ghost).await),
        AuthError::Revoked
    );
    let unknown =
        e.id.issue_jwt(Uuid::new_v4(), None, None, 60, &by(alice))
            .await;
    assert!(matches!(unknown, Err(Error::NotFound { .. })));
    let audit = e.id.audit(Owner::User(alice), None, 1).await.unwrap();
    assert_eq!(audit[0].action, "token.issued");

    // Bot tokens act for the bot's owner and die with the bot.
    let bot =
        e.id.create_bot(Owner::User(alice), "ci", &by(alice))
            .await
            .unwrap();
    let (bot_token, _) =
        e.id.issue_jwt(alice, None, Some(bot.id), 3600, &by(alice))
            .await
            .unwrap();
    assert_eq!(
        e.id.authenticate(&bot_token).await.unwrap().bot,
        Some(bot.id)
    );
    e.id.delete_bot(Owner::User(alice), bot.id, &by(alice))
        .await
        .unwrap();
    assert_eq!(
        auth_err(e.id.authenticate(&bot_token).await),
        AuthError::Revoked
    );
}

async fn api_keys(pg: bool) {
    let e = Env::new(pg).await;
    let alice = e.user("alice@example.com").await;
    let (key, view) =
        e.id.create_api_key(Owner::User(alice), "laptop", None, &by(alice))
            .await
            .unwrap();
    assert!(key.starts_with("kc_") && key.len() == 46);
    assert!(view.hint.ends_with(&key[key.len() - 4..]));
    let p = e.id.authenticate(&key).await.unwrap();
    assert_eq!((p.user, p.credential), (alice, Credential::ApiKey(view.id)));

    let listed = e.id.list_api_keys(Owner::User(alice)).await.unwrap();
    let mut names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["initial", "laptop"],
        "the first key comes with the user"
    );
    assert!(!serde_json::to_string(&listed).unwrap().contains(&key[3..]));

    e.id.revoke_api_key(Owner::User(alice), view.id, &by(alice))
        .await
        .unwrap();
    assert_eq!(
        auth_err(e.id.authenticate(&key).await),
        AuthError::ApiKeyRevoked
    );

    // Another owner cannot revoke it: it does not exist for them.
    let bob = e.user("bob@example.com").await;
    let (_, other) =
        e.id.create_api_key(Owner::User(alice), "x", None, &by(alice))
            .await
            .unwrap();
    assert!(matches!(
        e.id.revoke_api_key(Owner::User(bob), other.id, &by(bob))
            .await,
        Err(Error::NotFound { .. })
    ));

    let (expiring, _) =
        e.id.create_api_key(Owner::User(alice), "short", Some(T0 + 1000), &by(alice))
            .await
            .unwrap();
    e.id.authenticate(&expiring).await.unwrap();
    e.clock.advance(1000);
    assert_eq!(
        auth_err(e.id.authenticate(&expiring).await),
        AuthError::ApiKeyExpired
    );

    let unknown = kilocloud_identity::credential::generate_api_key();
    assert_eq!(
        auth_err(e.id.authenticate(&unknown).await),
        AuthError::ApiKeyUnknown
    );
    assert!(matches!(
        auth_err(e.id.authenticate("kc_short").await),
        AuthError::Malformed(_)
    ));

    // An organization's key acts as its creator in that organization, while they are a member.
    let org = e.id.create_org("Acme", &by(alice)).await.unwrap();
    e.id.put_member(org.id, bob, Role::Admin, &by(alice))
        .await
        .unwrap();
    let (org_key, _) =
        e.id.create_api_key(Owner::Org(org.id), "ci", None, &by(bob))
            .await
            .unwrap();
    let p = e.id.authenticate(&org_key).await.unwrap();
    assert_eq!((p.user, p.pinned_org), (bob, Some(org.id)));
    let scope = e.id.scope(&p, None).await.unwrap();
    assert_eq!((scope.owner, scope.role), (Owner::Org(org.id), Role::Admin));
    assert_eq!(
        code(e.id.scope(&p, Some(Uuid::new_v4())).await),
        "organization_mismatch"
    );
    e.id.remove_member(org.id, bob, &by(alice)).await.unwrap();
    assert_eq!(code(e.id.scope(&p, None).await), "not_a_member");
}

async fn tickets(pg: bool) {
    let e = Env::new(pg).await;
    let alice = e.user("alice@example.com").await;
    let (ticket, expires) = e.id.issue_ticket(alice, "session:agent_1").await.unwrap();
    assert_eq!(expires, T0 + TICKET_TTL_MS);
    assert_eq!(
        auth_err(e.id.redeem_ticket(&ticket, "session:agent_2").await),
        AuthError::TicketInvalid,
        "another resource is refused"
    );
    assert_eq!(
        e.id.redeem_ticket(&ticket, "session:agent_1")
            .await
            .unwrap(),
        alice
    );
    assert_eq!(
        auth_err(e.id.redeem_ticket(&ticket, "session:agent_1").await),
        AuthError::TicketInvalid,
        "a ticket works once"
    );

    let (late, _) = e.id.issue_ticket(alice, "r").await.unwrap();
    e.clock.advance(TICKET_TTL_MS);
    assert_eq!(
        auth_err(e.id.redeem_ticket(&late, "r").await),
        AuthError::TicketExpired
    );
    assert_eq!(
        auth_err(e.id.redeem_ticket(&late, "r").await),
        AuthError::TicketInvalid
    );

    // A forged ticket naming alice, and garbage.
    let forged = kilocloud_identity::credential::generate_ticket(alice);
    assert_eq!(
        auth_err(e.id.redeem_ticket(&forged, "r").await),
        AuthError::TicketInvalid
    );
    assert!(matches!(
        auth_err(e.id.redeem_ticket("kt_nope", "r").await),
        AuthError::Malformed(_)
    ));

    // Outstanding tickets are bounded; expired ones make room.
    for _ in 0..kilocloud_identity::MAX_TICKETS_PER_USER {
        e.id.issue_ticket(alice, "r").await.unwrap();
    }
    assert_eq!(
        code(e.id.issue_ticket(alice, "r").await),
        "too_many_tickets"
    );
    e.clock.advance(TICKET_TTL_MS);
    e.id.issue_ticket(alice, "r").await.unwrap();
}

async fn secrets_and_master_key_rotation(pg: bool) {
    let old = MasterKey::generate().0;
    let new = MasterKey::generate().0;
    let e = Env::with_key(pg, old.clone()).await;
    let alice = e.user("alice@example.com").await;
    let org = e.id.create_org("Acme", &by(alice)).await.unwrap();
    let user_owner = Owner::User(alice);
    e.id.put_secret(user_owner, "OPENAI_KEY", b"sk-user-1", &by(alice))
        .await
        .unwrap();
    e.id.put_secret(Owner::Org(org.id), "GITHUB_TOKEN", b"ghp-org-1", &by(alice))
        .await
        .unwrap();
    e.clock.advance(5);
    let meta =
        e.id.put_secret(user_owner, "OPENAI_KEY", b"sk-user-2", &by(alice))
            .await
            .unwrap();
    assert_eq!((meta.created_at_ms, meta.updated_at_ms), (T0, T0 + 5));
    assert_eq!(
        e.id.secret_value(user_owner, "OPENAI_KEY")
            .await
            .unwrap()
            .unwrap(),
        b"sk-user-2"
    );
    let listed = e.id.list_secrets(user_owner).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!serde_json::to_string(&listed).unwrap().contains("sk-user"));
    assert!(matches!(
        e.id.put_secret(user_owner, "bad name", b"v", &by(alice))
            .await,
        Err(Error::Invalid(_))
    ));
    // Nothing about the value is in the stored form.
    let snap = e
        .sub
        .actor_snapshot("owner", &user_owner.to_string())
        .await
        .unwrap();
    let stored = serde_json::to_string(&snap).unwrap();
    assert!(stored.contains("OPENAI_KEY") && !stored.contains("sk-user"));

    // Rotate: the new key encrypts, the old one still decrypts until re-wrapped.
    let rotated = identity(&e.sub, MasterKeys::new(new.clone(), vec![old.clone()]));
    assert_eq!(
        rotated
            .secret_value(user_owner, "OPENAI_KEY")
            .await
            .unwrap()
            .unwrap(),
        b"sk-user-2"
    );
    let mut progress = 0;
    let report = rotated.rotate_master_key(|_| progress += 1).await.unwrap();
    assert_eq!((report.rewrapped, report.already_current), (2, 0));
    assert!(report.owners >= 2 && progress >= 1);
    let again = rotated.rotate_master_key(|_| ()).await.unwrap();
    assert_eq!((again.rewrapped, again.already_current), (0, 2));

    let only_new = identity(&e.sub, MasterKeys::new(new, vec![]));
    assert_eq!(
        only_new
            .secret_value(Owner::Org(org.id), "GITHUB_TOKEN")
            .await
            .unwrap()
            .unwrap(),
        b"ghp-org-1"
    );
    let only_old = identity(&e.sub, MasterKeys::new(old, vec![]));
    assert!(matches!(
        only_old.secret_value(user_owner, "OPENAI_KEY").await,
        Err(Error::Crypto(CryptoError::UnknownKey(_)))
    ));

    only_new
        .delete_secret(user_owner, "OPENAI_KEY", &by(alice))
        .await
        .unwrap();
    assert_eq!(
        only_new
            .secret_value(user_owner, "OPENAI_KEY")
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        only_new
            .delete_secret(user_owner, "OPENAI_KEY", &by(alice))
            .await,
        Err(Error::NotFound { .. })
    ));
}

async fn membership_rules(pg: bool) {
    let e = Env::new(pg).await;
    let (owner, admin, member) = (
        e.user("owner@example.com").await,
        e.user("admin@example.com").await,
        e.user("member@example.com").await,
    );
    let org = e.id.create_org("Acme", &by(owner)).await.unwrap();
    e.id.put_member(org.id, admin, Role::Admin, &by(owner))
        .await
        .unwrap();
    e.id.put_member(org.id, member, Role::Member, &by(admin))
        .await
        .unwrap();
    assert_eq!(
        e.id.org_role(org.id, member).await.unwrap(),
        Some(Role::Member)
    );

    assert_eq!(
        code(
            e.id.put_member(org.id, member, Role::Owner, &by(admin))
                .await
        ),
        "insufficient_role"
    );
    assert_eq!(
        code(e.id.remove_member(org.id, owner, &by(admin)).await),
        "insufficient_role"
    );
    assert_eq!(
        code(e.id.remove_member(org.id, admin, &by(member)).await),
        "insufficient_role"
    );
    assert_eq!(
        code(
            e.id.put_member(org.id, admin, Role::Admin, &by(member))
                .await
        ),
        "insufficient_role"
    );
    assert_eq!(
        code(e.id.remove_member(org.id, owner, &by(owner)).await),
        "last_owner"
    );
    assert_eq!(
        code(
            e.id.put_member(org.id, owner, Role::Admin, &by(owner))
                .await
        ),
        "last_owner"
    );

    let orgs = e.id.orgs_of(member).await.unwrap();
    assert_eq!((orgs.len(), orgs[0].role), (1, Role::Member));
    e.id.remove_member(org.id, member, &by(member))
        .await
        .unwrap();
    assert!(e.id.orgs_of(member).await.unwrap().is_empty());
    assert_eq!(e.id.org_role(org.id, member).await.unwrap(), None);

    // Promote the admin to owner; now the first owner may leave.
    e.id.put_member(org.id, admin, Role::Owner, &by(owner))
        .await
        .unwrap();
    e.id.remove_member(org.id, owner, &by(owner)).await.unwrap();
    assert_eq!(e.id.members(org.id).await.unwrap().len(), 1);

    e.id.delete_org(org.id, &by(admin)).await.unwrap();
    assert!(e.id.org(org.id).await.unwrap().is_none());
    assert!(e.id.orgs_of(admin).await.unwrap().is_empty());
    let log = e.id.audit(Owner::User(admin), None, 10).await.unwrap();
    assert_eq!(log[0].action, "org.deleted");
}

async fn audit_log(pg: bool) {
    let e = Env::new(pg).await;
    let alice = e.user("alice@example.com").await;
    let bob = e.user("bob@example.com").await;
    let org = e.id.create_org("Acme", &by(alice)).await.unwrap();
    let o = Owner::Org(org.id);
    e.id.put_member(org.id, bob, Role::Member, &by(alice))
        .await
        .unwrap();
    let (_, key) =
        e.id.create_api_key(o, "ci", None, &by(alice))
            .await
            .unwrap();
    e.id.revoke_api_key(o, key.id, &by(alice)).await.unwrap();
    e.id.put_secret(o, "S", b"v", &by(alice)).await.unwrap();
    e.id.delete_secret(o, "S", &by(alice)).await.unwrap();
    e.id.remove_member(org.id, bob, &by(alice)).await.unwrap();

    let log = e.id.audit(o, None, 100).await.unwrap();
    let actions: Vec<&str> = log.iter().rev().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "org.created",
            "member.added",
            "member.added",
            "token.created",
            "token.revoked",
            "secret.written",
            "secret.deleted",
            "member.removed"
        ]
    );
    assert!(
        log.iter()
            .all(|a| a.actor == alice && a.owner == o && a.at_ms == T0)
    );
    assert_eq!(log[0].request_id, by(alice).request_id);
    let page = e.id.audit(o, Some(log[2].seq), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|a| a.seq).collect::<Vec<_>>(),
        [log[3].seq, log[4].seq]
    );

    e.id.rotate_pepper(alice, &by(alice)).await.unwrap();
    let mine = e.id.audit(Owner::User(alice), None, 1).await.unwrap();
    assert_eq!(mine[0].action, "pepper.rotated");
}

async fn bootstrap_and_unique_emails(pg: bool) {
    let e = Env::new(pg).await;
    let (a, b) = tokio::join!(
        e.id.bootstrap("root@example.com"),
        e.id.bootstrap("root@example.com")
    );
    let created: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(created.len(), 1, "exactly one node bootstraps");
    let (admin, key) = &created[0];
    assert!(admin.is_admin);
    let p = e.id.authenticate(key).await.unwrap();
    assert_eq!((p.user, p.is_admin), (admin.id, true));
    // Credentials pinned to an organization never carry site-administrator rights.
    let org = e.id.create_org("Ops", &by(admin.id)).await.unwrap();
    let (org_key, _) =
        e.id.create_api_key(Owner::Org(org.id), "ops", None, &by(admin.id))
            .await
            .unwrap();
    assert!(!e.id.authenticate(&org_key).await.unwrap().is_admin);
    let (pinned, _) =
        e.id.issue_jwt(admin.id, Some(org.id), None, 60, &by(admin.id))
            .await
            .unwrap();
    assert!(!e.id.authenticate(&pinned).await.unwrap().is_admin);
    assert!(e.id.bootstrap("root@example.com").await.unwrap().is_none());
    assert_eq!(e.id.bootstrap_admin().await.unwrap(), Some(admin.id));

    assert_eq!(
        code(
            e.id.create_user("ROOT@example.com", "x", false, &by(admin.id))
                .await
        ),
        "email_taken"
    );
    assert!(matches!(
        e.id.create_user("not-an-email", "x", false, &by(admin.id))
            .await,
        Err(Error::Invalid(_))
    ));
    // Racing creations of one email: exactly one wins, whatever the interleaving.
    for round in 0..5 {
        let (email, creator) = (format!("race{round}@example.com"), by(admin.id));
        let (a, b) = tokio::join!(
            e.id.create_user(&email, "a", false, &creator),
            e.id.create_user(&email, "b", false, &creator)
        );
        let won = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{a:?} {b:?}");
        let lost = if a.is_ok() { b } else { a };
        assert_eq!(code(lost), "email_taken");
    }
    let found =
        e.id.user_by_email("Root@Example.com")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(found.id, admin.id);
}

async fn internal_key(pg: bool) {
    let e = Env::new(pg).await;
    e.id.verify_internal_key(Some(b"internal")).unwrap();
    for bad in [None, Some(&b"internaL"[..]), Some(b""), Some(b"internal ")] {
        assert_eq!(
            auth_err(e.id.verify_internal_key(bad)),
            AuthError::InternalKey
        );
    }
    let unset = Identity::new(
        &e.sub,
        IdentityConfig {
            jwt_secret: JWT_SECRET.to_vec(),
            master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
            internal_api_secret: Some(String::new()),
        },
    );
    assert_eq!(
        auth_err(unset.verify_internal_key(Some(b""))),
        AuthError::InternalKey
    );
}
