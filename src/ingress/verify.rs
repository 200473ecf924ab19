//! Is this callback really Tencent's, for our app? `SdkAppid` against the accepted list, and with
//! a token configured, `Sign = lowercase_hex(sha256(token + RequestTime))` compared in constant
//! time, with `RequestTime` no further from now than `max_request_age_secs`.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TencentConfig;
use crate::event::{hex, CallbackQuery};

/// The query string, split into what imrelay reads.
#[derive(Debug, Default)]
pub struct Query {
    pub callback: CallbackQuery,
    pub sdk_app_id_raw: Option<String>,
    pub sign: Option<String>,
    pub request_time: Option<String>,
}

impl Query {
    /// Parameters may come in any order; unknown ones are ignored.
    pub fn parse(raw: &str) -> Query {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            match &*k {
                "SdkAppid" => q.sdk_app_id_raw = Some(v.into_owned()),
                "CallbackCommand" => q.callback.command = Some(v.into_owned()),
                "ClientIP" => q.callback.client_ip = v.into_owned(),
                "OptPlatform" => q.callback.platform = v.into_owned(),
                "Sign" => q.sign = Some(v.into_owned()),
                "RequestTime" => q.request_time = Some(v.into_owned()),
                _ => {}
            }
        }
        q.callback.sdk_app_id = q
            .sdk_app_id_raw
            .as_deref()
            .and_then(|s| s.trim().parse().ok());
        q
    }
}

/// Why a callback was refused before its body was read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("SdkAppid is missing")]
    NoAppId,
    #[error("SdkAppid {0} is not accepted")]
    WrongAppId(String),
    #[error("Sign and RequestTime are required")]
    NoSignature,
    #[error("RequestTime is not a number of seconds")]
    BadTime,
    #[error("RequestTime is too far from now")]
    Stale,
    #[error("Sign does not match")]
    BadSign,
}

impl Refusal {
    /// 403 for the wrong app, 401 for failed authentication.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NoAppId | Refusal::WrongAppId(_) => 403,
            _ => 401,
        }
    }
}

pub fn verify(q: &Query, tencent: &TencentConfig) -> Result<(), Refusal> {
    let raw = q.sdk_app_id_raw.as_deref().ok_or(Refusal::NoAppId)?;
    let id = q
        .callback
        .sdk_app_id
        .ok_or_else(|| Refusal::WrongAppId(raw.to_string()))?;
    if !tencent.sdk_app_ids.is_empty() && !tencent.sdk_app_ids.contains(&id) {
        return Err(Refusal::WrongAppId(raw.to_string()));
    }
    let Some(token) = &tencent.token else {
        return Ok(());
    };
    let (Some(sign), Some(time)) = (&q.sign, &q.request_time) else {
        return Err(Refusal::NoSignature);
    };
    let seconds: u64 = time.trim().parse().map_err(|_| Refusal::BadTime)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.abs_diff(seconds) > tencent.max_request_age.as_secs() {
        return Err(Refusal::Stale);
    }
    let expected = expected_sign(token, time);
    let given = sign.to_ascii_lowercase();
    if expected.as_bytes().ct_eq(given.as_bytes()).into() {
        Ok(())
    } else {
        Err(Refusal::BadSign)
    }
}

/// `lowercase_hex(sha256(token + RequestTime))`.
pub fn expected_sign(token: &str, request_time: &str) -> String {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update(request_time.as_bytes());
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The vector from Tencent's documentation (PROTOCOL.md §2).
    #[test]
    fn documented_vector() {
        assert_eq!(
            expected_sign("xxxxyyyy", "1669872112"),
            "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
        );
    }

    #[test]
    fn query_in_any_order_with_optional_fields() {
        let q = Query::parse(
            "CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&SdkAppid=1400399479",
        );
        assert_eq!(q.callback.sdk_app_id, Some(1_400_399_479));
        assert_eq!(
            q.callback.command.as_deref(),
            Some("Group.CallbackAfterSendMsg")
        );
        assert_eq!(q.callback.client_ip, "");
    }

    #[test]
    fn app_id_and_sign_checks() {
        let mut t = TencentConfig {
            sdk_app_ids: vec![888888],
            token: None,
            max_request_age: Duration::from_secs(300),
            bot_accounts: vec![],
        };
        assert_eq!(verify(&Query::parse(""), &t), Err(Refusal::NoAppId));
        assert_eq!(
            verify(&Query::parse("SdkAppid=1"), &t),
            Err(Refusal::WrongAppId("1".into()))
        );
        assert_eq!(
            verify(&Query::parse("SdkAppid=abc"), &t),
            Err(Refusal::WrongAppId("abc".into()))
        );
        assert_eq!(verify(&Query::parse("SdkAppid=888888"), &t), Ok(()));
        t.token = Some("xxxxyyyy".into());
        assert_eq!(
            verify(&Query::parse("SdkAppid=888888"), &t),
            Err(Refusal::NoSignature)
        );
        let old = "SdkAppid=888888&RequestTime=1669872112&Sign=17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061";
        assert_eq!(verify(&Query::parse(old), &t), Err(Refusal::Stale));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let good = format!(
            "SdkAppid=888888&RequestTime={now}&Sign={}",
            expected_sign("xxxxyyyy", &now)
        );
        assert_eq!(verify(&Query::parse(&good), &t), Ok(()));
        let bad = format!(
            "SdkAppid=888888&RequestTime={now}&Sign={}",
            expected_sign("other", &now)
        );
        assert_eq!(verify(&Query::parse(&bad), &t), Err(Refusal::BadSign));
    }
}
