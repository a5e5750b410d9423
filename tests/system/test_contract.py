"""The wire contract: generated code matches proto/, and proto/ matches a stock client's messages."""

from __future__ import annotations

import subprocess
import sys

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb

from conftest import ROOT

GENERATED = ROOT / "services" / "inferencehub" / "protocol"


def test_generated_code_is_up_to_date(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    fresh = {
        p.relative_to(tmp_path / "inferencehub" / "protocol"): p.read_bytes()
        for p in (tmp_path / "inferencehub" / "protocol").rglob("*")
        if p.is_file()
    }
    committed = {
        p.relative_to(GENERATED): p.read_bytes()
        for p in GENERATED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(map(str, fresh)) == sorted(map(str, committed)), "run `make proto`"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is out of date with proto/ ({', '.join(stale)}): run `make proto`"


def our_descriptors(tmp_path) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = tmp_path / "contract.pb"
    well_known = f"{grpc_tools.__path__[0]}/_proto"
    files = [str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")]
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--descriptor_set_out={out}", *files]) == 0
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, messages) -> None:
        for message in messages:
            found[prefix + message.name] = message
            walk(prefix + message.name + ".", message.nested_type)

    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for file in file_set.file:
        if file.package == "inference":
            walk("", file.message_type)
            found["__service__"] = file.service[0]  # type: ignore[assignment]
            found["__enums__"] = file.enum_type  # type: ignore[assignment]
    return found


def test_messages_match_tritonclient_on_the_wire(tmp_path):
    ours = our_descriptors(tmp_path)
    service = ours.pop("__service__")
    assert service.name == "GRPCInferenceService"
    triton_service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.method:
        theirs = triton_service.methods_by_name[method.name]
        assert method.input_type == "." + theirs.input_type.full_name
        assert method.output_type == "." + theirs.output_type.full_name
    for enum in ours.pop("__enums__"):
        theirs = {v.name: v.number for v in triton_config_pb.DESCRIPTOR.enum_types_by_name[enum.name].values}
        assert {v.name: v.number for v in enum.value} == theirs, enum.name
    assert len(ours) >= 25
    for name, message in ours.items():
        if name.endswith("ParametersEntry"):
            continue
        top = name.split(".")[0]
        module = triton_pb if top in triton_pb.DESCRIPTOR.message_types_by_name else triton_config_pb
        theirs = module.DESCRIPTOR.message_types_by_name[top]
        for part in name.split(".")[1:]:
            theirs = theirs.nested_types_by_name[part]
        their_fields = {f.name: (f.number, f.type, f.is_repeated) for f in theirs.fields}
        for field in message.field:
            repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            assert their_fields.get(field.name) == (field.number, field.type, repeated), f"{name}.{field.name}"
