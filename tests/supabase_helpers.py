"""Shared set-up for the Supabase service tests: a contract stand-in on loopback and a project pointed at it.

The stand-in (:mod:`pgferry.testing.supabase_contract`) serves GoTrue's, Storage's and the functions gateway's
documented responses; supabase-py talks to it unchanged over real HTTP. Tokens are signed for real (HS256 or ES256
with a JWKS) and verified for real by :mod:`pgferry.sync.auth`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pgferry.supabase.project import SupabaseProject
from pgferry.testing.supabase_contract import ContractServer

SECRET = "contract-test-jwt-secret-0123456789abcdef"
ALICE = ("alice@example.com", "alice-password-1")
BOB = ("bob@example.com", "bob-password-22")


@dataclass
class Stack:
    server: ContractServer
    project: SupabaseProject
    alice_id: str
    bob_id: str


@contextmanager
def stack(*, asymmetric: bool = False, **server_options: object) -> Iterator[Stack]:
    server = ContractServer(jwt_secret=None if asymmetric else SECRET, **server_options)  # type: ignore[arg-type]
    alice_id = server.add_user(*ALICE)
    bob_id = server.add_user(*BOB)
    server.add_bucket("artifacts")
    with server.serve():
        project = SupabaseProject(
            server.url,
            server.anon_key,
            service_role_key=server.service_role_key,
            jwt_secret=None if asymmetric else SECRET,
            jwks_url=server.jwks_url if asymmetric else None,
            timeout=10,
            verifier_options={"jwks_min_refetch": 0.0},
        )
        try:
            yield Stack(server, project, alice_id, bob_id)
        finally:
            project.close()
