"""Sampling a registered ensemble: from a running coordinator, or from a catalogue and its
blob store. Every member is verified (digest, signature, signer trusted) before it is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import torch
from torch import nn

from tspace_core.catalogue.records import CheckpointRecord, EnsembleRecord
from tspace_core.checkpoint import load_checkpoint
from tspace_core.ensemble import Chain, model_from_checkpoint
from tspace_core.errors import CheckpointError, TspaceError
from tspace_core.fsio import sha256_file
from tspace_core.rpc import ChannelSecurity
from tspace_core.sampling import EnsemblePredictor
from tspace_core.states import LatentStates
from tspace_core.verification import checkpoint_problems

TIMEOUT_S = 60.0


def verify_member(record: CheckpointRecord, path: Path) -> None:
    """Refuse a member unless its file, digest, signature and signer all check out."""
    problems = checkpoint_problems(record, path)
    if problems:
        raise CheckpointError(f"unit {record.unit}: {problems[0]}")


def assemble(
    record: EnsembleRecord,
    paths: dict[int, Path],
    timesteps: tuple[int, ...],
    alphas: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> tuple[EnsemblePredictor, Chain, str]:
    """The predictor and chain of an ensemble whose member files are verified, and its job
    (`spec_json`: the resolved job the catalogue recorded)."""
    untrusted = [m.unit for m in record.members if not m.checkpoint.trusted]
    if untrusted:
        raise CheckpointError(
            f"unit{'s' if len(untrusted) > 1 else ''} {', '.join(map(str, untrusted))}: signed by "
            f"a revoked worker; {record.name} cannot be sampled now. Those units were requeued: "
            "once they are trained again, a checkpoint reproduced byte for byte is trusted again; "
            "otherwise sample the ensemble registered then"
        )
    units: list[tuple[tuple[int, ...], nn.Module]] = []
    meta: dict = {}
    for member in record.members:
        verify_member(member.checkpoint, paths[member.unit])
        ckpt = load_checkpoint(paths[member.unit])
        meta = ckpt.meta
        units.append(
            (member.timesteps, model_from_checkpoint(ckpt, member.unit, member.timesteps, device))
        )
    config = meta["unet_config"]
    side, channels = config["sample_size"], config["in_channels"]
    chain = Chain(
        LatentStates(timesteps, alphas),
        (channels, side, side),
        config.get("num_class_embeds") or 0,
        meta["prediction_type"],
    )
    return EnsemblePredictor.from_units(units), chain, record.spec_json


def from_catalogue(
    url: str, store: Path, name: str, device: torch.device | str = "cpu"
) -> tuple[EnsemblePredictor, Chain, str]:
    """Read the ensemble from a catalogue and its members from the coordinator's blob store."""
    from tspace_core.blobs import BlobStore
    from tspace_core.catalogue import Catalogue

    catalogue = Catalogue(url)
    try:
        record = catalogue.get_ensemble(name)
    finally:
        catalogue.close()
    resolved = json.loads(record.spec_json)
    blobs = BlobStore(store)
    paths = {m.unit: blobs.path(m.checkpoint.sha256) for m in record.members}
    return assemble(
        record, paths, tuple(resolved["latent_states"]), tuple(resolved["alphas_cumprod"]), device
    )


def from_coordinator(
    address: str,
    credential: str,
    name: str,
    cache: Path,
    device: torch.device | str = "cpu",
    security: ChannelSecurity | None = None,
) -> tuple[EnsemblePredictor, Chain, str]:
    """Fetch the ensemble and its members from a running coordinator (admin credential), over
    TLS with `security`."""
    from tspace_core import serde
    from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
    from tspace_core.rpc import ADMIN_HEADER, iter_stream, open_channel

    metadata = ((ADMIN_HEADER, credential),)
    with open_channel(address, security) as channel:
        try:
            proto = admin_pb2_grpc.AdminServiceStub(channel).GetEnsemble(
                admin_pb2.GetEnsembleRequest(name=name), timeout=TIMEOUT_S, metadata=metadata
            )
            record, timesteps, alphas = serde.ensemble_from_proto(proto)
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            paths = {}
            for member in record.members:
                ref = member.checkpoint
                path = cache / ref.sha256
                if not path.exists() or sha256_file(path) != ref.sha256:
                    cache.mkdir(parents=True, exist_ok=True)
                    stream = stub.FetchCheckpoint(
                        worker_pb2.FetchRequest(sha256=ref.sha256),
                        timeout=600.0,
                        metadata=metadata,
                    )
                    path.write_bytes(b"".join(iter_stream(stream, expected_size=ref.size)))
                paths[member.unit] = path
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = (
                    "if it serves TLS, pass --ca with its CA certificate"
                    if security is None
                    else "if it requires client certificates, pass --client-cert and --client-key"
                    if security.cert_pem is None
                    else "check the address and that it is serving"
                )
                raise TspaceError(f"the coordinator at {address} is unreachable; {hint}") from None
            raise TspaceError(f"{exc.details()} ({code.name})") from None
    return assemble(record, paths, timesteps, alphas, device)
