//! The presigned AWS IoT WebSocket URL against an independent reference: botocore's
//! `SigV4QueryAuth` (given the credentials without the token, which is then appended), at the
//! same time and with the same credentials.

mod support;

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use iot_operator::aws::sigv4::presign_iot_url;

const REFERENCE: &str = r#"
import datetime, sys, urllib.parse
from unittest import mock
import botocore.auth
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

host, region, akid, secret, ts, expires, token = sys.argv[1:8]
when = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).replace(tzinfo=None)
req = AWSRequest(method="GET", url=f"wss://{host}/mqtt")
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
    SigV4QueryAuth(Credentials(akid, secret), "iotdevicegateway", region, expires=int(expires)).add_auth(req)
url = req.url
if token:
    url += "&X-Amz-Security-Token=" + urllib.parse.quote(token, safe="")
print(url)
"#;

fn reference(host: &str, region: &str, creds: &Credentials, ts: u64, expires: u64) -> String {
    support::run_python(
        REFERENCE,
        &[
            host,
            region,
            creds.access_key_id(),
            creds.secret_access_key(),
            &ts.to_string(),
            &expires.to_string(),
            creds.session_token().unwrap_or(""),
        ],
    )
}

fn query(url: &str) -> Vec<(String, String)> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[test]
fn presigned_url_matches_botocore() {
    let cases = [
        (
            "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com",
            "eu-west-1",
            Some("FwoGZXIvYXdzEJr//////////wEaDOx+token/with=chars"),
        ),
        (
            "a1b2c3d4e5f6g7-ats.iot.us-east-1.amazonaws.com",
            "us-east-1",
            None,
        ),
        ("127.0.0.1:18443", "eu-central-1", Some("short")),
    ];
    for (i, (host, region, token)) in cases.into_iter().enumerate() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(str::to_owned),
            None,
            "t",
        );
        let ts = 1_767_225_600 + i as u64 * 86_399;
        let ours = presign_iot_url(
            host,
            region,
            &creds,
            SystemTime::UNIX_EPOCH + Duration::from_secs(ts),
            Duration::from_secs(300),
        )
        .unwrap();
        let theirs = reference(host, region, &creds, ts, 300);
        let (q_ours, q_theirs) = (query(&ours), query(&theirs));
        let sig = |q: &[(String, String)]| {
            q.iter()
                .find(|(k, _)| k == "X-Amz-Signature")
                .map(|(_, v)| v.clone())
        };
        assert!(sig(&q_ours).is_some());
        assert_eq!(
            sig(&q_ours),
            sig(&q_theirs),
            "signature differs:\n ours   {ours}\n botocore {theirs}"
        );
        let mut a = q_ours.clone();
        let mut b = q_theirs.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "query parameters differ");
        // The token is unsigned and last.
        if let Some(t) = token {
            assert_eq!(
                q_ours.last(),
                Some(&("X-Amz-Security-Token".to_owned(), t.to_owned()))
            );
            assert!(ours.ends_with(&format!(
                "X-Amz-Security-Token={}",
                url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            )));
            let signed = q_ours
                .iter()
                .find(|(k, _)| k == "X-Amz-SignedHeaders")
                .unwrap();
            assert_eq!(signed.1, "host");
        } else {
            assert!(!ours.contains("Security-Token"));
        }
    }
}

#[test]
fn a_different_secret_gives_a_different_signature() {
    let ts = 1_767_225_600;
    let a = Credentials::new("AKIDEXAMPLE", "secret-one", None, None, "t");
    let b = Credentials::new("AKIDEXAMPLE", "secret-two", None, None, "t");
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(ts);
    let ours = presign_iot_url(
        "h.example.com",
        "eu-west-1",
        &a,
        at,
        Duration::from_secs(300),
    )
    .unwrap();
    let theirs = reference("h.example.com", "eu-west-1", &b, ts, 300);
    assert_ne!(query(&ours).last(), query(&theirs).last());
}
