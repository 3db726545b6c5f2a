//! Property tests: the credential and header parsers return an error, never panic, on any
//! input; and what the generators produce always parses back.

use kilocloud_identity::credential::{
    TokenSigner, credential_hash, generate_api_key, generate_ticket, parse_api_key, parse_ticket,
};
use kilocloud_identity::envelope::MasterKey;
use kilocloud_identity::owner::{Owner, parse_org_header};
use proptest::prelude::*;

fn token_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,60}",
        "kc_[A-Za-z0-9_=+/-]{0,50}",
        "kt_[A-Za-z0-9_=+/-]{0,70}",
        // A real header with arbitrary claims and signature.
        "[A-Za-z0-9_-]{0,120}\\.[A-Za-z0-9_-]{0,43}"
            .prop_map(|rest| format!("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{rest}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn jwt_verification_never_panics(token in token_like(), now in any::<i64>()) {
        let signer = TokenSigner::new(b"proptest-secret");
        let _ = signer.verify(&token, now);
    }

    #[test]
    fn api_key_and_ticket_parsers_never_panic(s in token_like()) {
        if let Ok(hash) = parse_api_key(&s) {
            prop_assert_eq!(hash, credential_hash(&s));
        }
        if let Ok((_, hash)) = parse_ticket(&s) {
            prop_assert_eq!(hash, credential_hash(&s));
        }
    }

    #[test]
    fn org_header_parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(Some(id)) = parse_org_header(&raw) {
            prop_assert_eq!(id.to_string(), String::from_utf8(raw).unwrap().trim().to_lowercase());
        }
    }

    #[test]
    fn owner_and_master_key_parsers_never_panic(s in any::<String>()) {
        if let Ok(owner) = s.parse::<Owner>() {
            prop_assert_eq!(owner.to_string().len(), s.len());
        }
        let _ = MasterKey::parse(&s);
    }

    #[test]
    fn generated_credentials_parse(user in any::<u128>()) {
        let user = uuid::Uuid::from_u128(user);
        prop_assert!(parse_api_key(&generate_api_key()).is_ok());
        let ticket = generate_ticket(user);
        prop_assert_eq!(parse_ticket(&ticket).unwrap().0, user);
    }
}
