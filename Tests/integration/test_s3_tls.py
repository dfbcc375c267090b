"""S3 over TLS: `rclone serve s3` with a self-signed certificate made for the test. walship
verifies certificates by default (a server it cannot verify is one clear error that names
the endpoint) and trusts a CA bundle named by AWS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE."""
import shutil
import subprocess
import time

from conftest import AgentProcess, assert_restores_exact, checkpoint_truncate, create_ticket_db, run_walship
from s3server import S3Server
from test_s3 import WORKLOAD, run_py

CA_VARIABLES = ("AWS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def self_signed_certificate(d):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificate: apt-get install openssl (make setup does)"
    cert, key = d / "cert.pem", d / "key.pem"
    p = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return cert, key


def env_without_ca(srv):
    e = srv.env()
    for k in CA_VARIABLES:
        e.pop(k, None)
    return e


def test_tls_verified_by_default_and_ca_bundle_variables_honoured(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    srv = S3Server(tmp_path / "s3", buckets=["walship"], tls=(cert, key)).start()
    try:
        url = srv.url("walship", "tls")
        assert url.startswith("s3://") and "endpoint=https://" in url, url
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=5)

        # Not trusted: one clear error naming the endpoint, from list, snapshot and replicate.
        plain = env_without_ca(srv)
        for args in (["list", url], ["snapshot", db, url], ["replicate", db, url]):
            p = run_walship(*args, env=plain, timeout=60)
            err = p.stderr
            assert p.returncode != 0, f"walship {args[0]} trusted an unknown certificate:\n{p.stdout}{err}"
            assert srv.endpoint in err and "certificate" in err.lower() and "AWS_CA_BUNDLE" in err, \
                f"walship {args[0]}: unclear error:\n{err}"
        assert not (tmp_path / "s3" / "walship" / "tls").exists(), "something was stored over an unverified connection"

        # Trusted through AWS_CA_BUNDLE: replicate and restore exactly.
        trusted = dict(plain, AWS_CA_BUNDLE=str(cert))
        agent = AgentProcess(db, [url], ["--sync-interval", "200ms"], env=trusted,
                             log_path=tmp_path / "agent.log").start().wait_ready()
        run_py(WORKLOAD, "mixed", db, "--seed", 3, "--tx", 40)
        time.sleep(0.6)
        agent.stop()
        checkpoint_truncate(db)
        assert_restores_exact(db, [(url, "tls")], tmp_path, env=trusted)

        # The other two variables work as well.
        for var in ("CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            p = run_walship("list", url, env=dict(plain, **{var: str(cert)}), timeout=60)
            assert p.returncode == 0 and "generation" in p.stdout, f"{var}: {p.stdout}{p.stderr}"
    finally:
        srv.stop()
