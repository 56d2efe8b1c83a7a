"""Shared pieces of the deploy tests: paths, a fleet key, TLS certificates, the deploy/ broker."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.broker import MOSQUITTO
from tests.support.processes import free_port, stop_process
from toco_core.bundle import generate_private_key

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def public_key_pem(path: Path) -> Path:
    """Write a fresh fleet Ed25519 public key (PEM) to ``path``."""
    key = generate_private_key().public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _cert(subject: str, pub, issuer: str, signer, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    return b.sign(signer, hashes.SHA256())


def write_certs(certs: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 in ``certs``; returns the CA file."""
    certs.mkdir(parents=True, exist_ok=True)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("toco test CA", ca_key.public_key(), "toco test CA", ca_key, ca=True)
    srv = _cert("127.0.0.1", srv_key.public_key(), "toco test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (certs / "ca.crt").write_bytes(ca.public_bytes(pem))
    (certs / "server.crt").write_bytes(srv.public_bytes(pem))
    (certs / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
    return certs / "ca.crt"


def render_broker_conf(conf: str, root: Path, ports: dict[int, int]) -> str:
    """deploy/mosquitto/toco.conf with its /etc and /var paths moved under ``root`` and ports remapped.

    Only paths and listener ports change: every other line is the shipped one.
    """
    out = []
    for line in conf.splitlines():
        line = line.replace("/etc/mosquitto/toco/", f"{root}/etc/").replace("/var/lib/mosquitto/", f"{root}/data/")
        if line.startswith("listener "):
            parts = line.split()
            parts[1] = str(ports[int(parts[1])])
            if len(parts) == 2:  # the shipped TLS listener binds every interface; here only loopback
                parts.append("127.0.0.1")
            line = " ".join(parts)
        out.append(line)
    return "\n".join(out) + "\n"


class DeployBroker:
    """mosquitto running deploy/mosquitto/toco.conf (paths and ports rewritten) in a temp dir."""

    USERS = ("toco-server", "cam-07", "cam-08")

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="toco-deploy-mosq-"))
        for d in ("etc", "data"):
            (self.root / d).mkdir()
        self.ca = write_certs(self.root / "etc" / "certs")
        self.passwords: dict[str, str] = {}
        for user in self.USERS:
            out = self.root / f"{user}.password"
            subprocess.run([str(DEPLOY / "mosquitto" / "add-device.sh"), user,
                            "--passwd", str(self.root / "etc/passwd"),
                            "--out", str(out)], check=True, capture_output=True, text=True)
            self.passwords[user] = out.read_text().strip()
        shutil.copy(DEPLOY / "mosquitto" / "acl", self.root / "etc" / "acl")
        self.plain, self.tls = free_port(), free_port()
        conf = render_broker_conf((DEPLOY / "mosquitto" / "toco.conf").read_text(), self.root,
                                  {1883: self.plain, 8883: self.tls})
        (self.root / "mosquitto.conf").write_text(conf)
        # run as root, mosquitto drops to user mosquitto: it must read all of this and write data/
        for p in [self.root, *self.root.rglob("*")]:
            os.chmod(p, 0o777 if p.is_dir() else 0o644)
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.root / "mosquitto.conf")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not all(self._listening(p) for p in (self.plain, self.tls)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"mosquitto with deploy/mosquitto/toco.conf did not start:\n{self.output()}")
            time.sleep(0.05)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def output(self) -> str:
        """What mosquitto logged (after it stopped)."""
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""

    def close(self) -> None:
        """Stop the broker and delete its directory."""
        stop_process(self.proc, 5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def deploy_broker():
    """The shipped broker config with the shipped ACL and passwords made by add-device.sh."""
    if not os.path.exists(MOSQUITTO) or shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto / mosquitto_passwd missing: apt-get install mosquitto (make system-deps)")
    b = DeployBroker()
    yield b
    b.close()


class Installed:
    """One run of deploy/install-agent.sh into a temp prefix (--no-systemd --no-user)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix, self.etc, self.state = root / "opt", root / "etc", root / "state"
        self.key = public_key_pem(root / "fleet.pem")
        self.password_file = root / "cam-07.password"
        self.password_file.write_text("s3cret-pw\n")
        # a snapshot of the checkout: the shared tree may change while the session runs
        self.source = root / "source"
        shutil.copytree(REPO, self.source, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "results", "artifacts", ".cache"))
        self.first = self.run()

    def args(self, **changes: str | None) -> list[str]:
        """The install command line; ``changes`` replace or (with None) drop ``--flag value`` pairs."""
        flags: dict[str, str | None] = {
            "--device-id": "cam-07", "--fleet": "plant1", "--broker-url": "mqtt://127.0.0.1:1883",
            "--password-file": str(self.password_file), "--public-key": str(self.key),
            "--memory-cap": "64MB", "--fidelity-budget": "1%", "--prefix": str(self.prefix),
            "--etc-dir": str(self.etc), "--state-dir": str(self.state),
            "--source": str(getattr(self, "source", REPO))}
        flags.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
        out = [str(DEPLOY / "install-agent.sh")]
        for k, v in flags.items():
            if v is not None:
                out += [k, v]
        return out + ["--no-systemd", "--no-user"]

    def run(self, **changes: str | None) -> subprocess.CompletedProcess:
        """Run the script (pip uses its normal cache); returns the finished process."""
        return subprocess.run(self.args(**changes), capture_output=True, text=True, timeout=480)

    def python(self, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``code`` with the installed venv's python, outside the repo (no accidental imports from it)."""
        return subprocess.run([str(self.prefix / "bin" / "python"), "-c", code], capture_output=True, text=True,
                              cwd=self.root, env={"PATH": os.environ.get("PATH", ""), **(env or {})}, timeout=120)


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """The agent installed ONCE per test session (~25 s: a fresh venv + the agent extra from this checkout)."""
    inst = Installed(tmp_path_factory.mktemp("install-agent"))
    assert inst.first.returncode == 0, f"install-agent.sh failed:\n{inst.first.stdout}\n{inst.first.stderr}"
    return inst
