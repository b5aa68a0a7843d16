"""The alignd.v1 protos: committed stubs are up to date, and buf-style lint rules hold.

The lint rules are checked on a descriptor set that protoc builds with
source info, so comments are read from SourceCodeInfo (no regex on .proto
text). Every failure lists the offending fully qualified names.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "alignd" / "v1"
STUB_DIR = ROOT / "libs" / "alignd" / "v1"
PACKAGE = "alignd.v1"

# Field numbers in descriptor.proto, used to build SourceCodeInfo paths.
FILE_MESSAGE_TYPE = 4
FILE_ENUM_TYPE = 5
FILE_SERVICE = 6
MESSAGE_FIELD = 2
MESSAGE_NESTED_TYPE = 3
MESSAGE_ENUM_TYPE = 4
ENUM_VALUE = 2
SERVICE_METHOD = 2


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# Generated stubs


def test_committed_stubs_match_generated(tmp_path):
    gen = _load_gen_protos()
    files = gen.generate(tmp_path)
    assert files, "gen_protos.generate produced no files"
    gen_dir = tmp_path / "alignd" / "v1"
    generated = {p.name for p in files}
    committed = {p.name for p in STUB_DIR.iterdir() if "_pb2" in p.name and p.name.endswith((".py", ".pyi"))}

    # Every .proto yields its three stubs.
    for proto in PROTO_DIR.glob("*.proto"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert proto.stem + suffix in generated, f"{proto.name}: no {proto.stem + suffix} generated"

    missing = sorted(generated - committed)
    assert not missing, f"generated but not committed (run scripts/gen_protos.py): {missing}"
    stale = sorted(committed - generated)
    assert not stale, f"committed stubs without a .proto (delete them): {stale}"
    differ = sorted(n for n in generated if (gen_dir / n).read_bytes() != (STUB_DIR / n).read_bytes())
    assert not differ, f"committed stubs differ from freshly generated ones (run scripts/gen_protos.py): {differ}"


# ---------------------------------------------------------------------------
# Descriptor set with source info


class Descriptors:
    """A FileDescriptorSet whose repr stays short in pytest failure reports."""

    def __init__(self, data: bytes) -> None:
        self.set = descriptor_pb2.FileDescriptorSet()
        self.set.ParseFromString(data)
        self.file = self.set.file

    def __repr__(self) -> str:
        return f"<FileDescriptorSet of {[f.name for f in self.file]}>"


def compile_descriptors(include: Path, protos: list[Path], out: Path) -> Descriptors:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *[str(p) for p in protos],
        ]
    )
    assert rc == 0, f"protoc failed with exit code {rc}"
    return Descriptors(out.read_bytes())


@pytest.fixture(scope="module")
def fds(tmp_path_factory) -> Descriptors:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos
    s = compile_descriptors(PROTO_ROOT, protos, tmp_path_factory.mktemp("descriptors") / "alignd.binpb")
    assert sorted(f.name for f in s.file) == sorted(f"alignd/v1/{p.name}" for p in protos)
    for f in s.file:
        assert f.source_code_info.location, f"{f.name}: no source info (protoc --include_source_info)"
    return s


def upper_snake(name: str) -> str:
    """buf's stringutil.ToUpperSnakeCase ("ImportResult" -> "IMPORT_RESULT",
    "HTTPMethod" -> "HTTP_METHOD", "DType" -> "D_TYPE")."""
    out = ""
    s = name.strip("_.- ")
    for i, c in enumerate(s):
        if c in ".- ":
            c = "_"
        if i == 0:
            out += c
            continue
        nxt = s[i + 1] if i + 1 < len(s) else ""
        if c.isupper() and out[-1] != "_" and ((nxt and not nxt.isupper() and nxt not in "_.- ") or s[i - 1].islower()):
            out += "_" + c
        else:
            out += c
    return out.upper()


@pytest.mark.parametrize(
    "name, want",
    [
        ("FinishReason", "FINISH_REASON"),
        ("RunState", "RUN_STATE"),
        ("HTTPMethod", "HTTP_METHOD"),
        ("ITDepartmentRegion", "IT_DEPARTMENT_REGION"),
        ("DType", "D_TYPE"),
        ("Lang", "LANG"),
    ],
)
def test_upper_snake_matches_buf(name, want):
    assert upper_snake(name) == want


def walk(fds):
    """Yields (kind, full_name, file, path, descriptor) for every element.

    kind is one of service, rpc, message, field, enum, enum_value. Synthetic
    map-entry messages (and their fields) are skipped: they have no source.
    """

    def message(f, prefix, path, m):
        full = f"{prefix}.{m.name}"
        if m.options.map_entry:
            return
        yield "message", full, f, path, m
        for i, fld in enumerate(m.field):
            yield "field", f"{full}.{fld.name}", f, (*path, MESSAGE_FIELD, i), fld
        for i, nested in enumerate(m.nested_type):
            yield from message(f, full, (*path, MESSAGE_NESTED_TYPE, i), nested)
        for i, e in enumerate(m.enum_type):
            yield from enum(f, full, (*path, MESSAGE_ENUM_TYPE, i), e)

    def enum(f, prefix, path, e):
        full = f"{prefix}.{e.name}"
        yield "enum", full, f, path, e
        for i, v in enumerate(e.value):
            yield "enum_value", f"{full}.{v.name}", f, (*path, ENUM_VALUE, i), v

    for f in fds.file:
        pkg = f.package
        for i, m in enumerate(f.message_type):
            yield from message(f, pkg, (FILE_MESSAGE_TYPE, i), m)
        for i, e in enumerate(f.enum_type):
            yield from enum(f, pkg, (FILE_ENUM_TYPE, i), e)
        for i, svc in enumerate(f.service):
            full = f"{pkg}.{svc.name}"
            yield "service", full, f, (FILE_SERVICE, i), svc
            for j, rpc in enumerate(svc.method):
                yield "rpc", f"{full}.{rpc.name}", f, (FILE_SERVICE, i, SERVICE_METHOD, j), rpc


# Rules: each returns the list of violations (empty = clean).


def package_violations(fds) -> list[str]:
    bad = []
    for f in fds.file:
        directory = f.name.rsplit("/", 1)[0].replace("/", ".") if "/" in f.name else ""
        if f.package != PACKAGE or f.package != directory:
            bad.append(f"{f.name}: package {f.package!r} (directory {directory!r}, expected {PACKAGE!r})")
    return bad


def enum_zero_violations(fds) -> list[str]:
    bad = []
    for kind, full, _f, _path, e in walk(fds):
        if kind == "enum":
            want = f"{upper_snake(e.name)}_UNSPECIFIED"
            zero = [v.name for v in e.value if v.number == 0]
            if zero != [want]:
                bad.append(f"{full}: zero value {zero}, expected {want}")
    return bad


def enum_prefix_violations(fds) -> list[str]:
    bad = []
    for kind, full, _f, _path, e in walk(fds):
        if kind == "enum":
            prefix = upper_snake(e.name) + "_"
            bad += [f"{full}.{v.name} (expected prefix {prefix})" for v in e.value if not v.name.startswith(prefix)]
    return bad


def rpc_type_violations(fds) -> list[str]:
    bad = []
    used: dict[str, list[str]] = {}
    for kind, full, f, _path, rpc in walk(fds):
        if kind != "rpc":
            continue
        req, res = rpc.input_type.lstrip("."), rpc.output_type.lstrip(".")
        want_req, want_res = f"{f.package}.{rpc.name}Request", f"{f.package}.{rpc.name}Response"
        if req != want_req:
            bad.append(f"{full}: request type {req}, expected {want_req}")
        if res != want_res:
            bad.append(f"{full}: response type {res}, expected {want_res}")
        used.setdefault(req, []).append(f"{full} (request)")
        used.setdefault(res, []).append(f"{full} (response)")
    bad += [f"{msg} is used by several RPCs: {', '.join(rpcs)}" for msg, rpcs in sorted(used.items()) if len(rpcs) > 1]
    return bad


def comment_violations(fds) -> list[str]:
    bad = []
    for f in fds.file:
        locations = {tuple(loc.path): loc for loc in f.source_code_info.location}
        for kind, full, ff, path, _d in walk(fds):
            if ff is not f:
                continue
            loc = locations.get(tuple(path))
            if loc is None:
                bad.append(f"{kind} {full}: no source location")
            elif not loc.leading_comments.strip():
                bad.append(f"{kind} {full}: no leading comment")
    return bad


def test_walker_sees_every_kind(fds):
    seen = dict.fromkeys(("service", "rpc", "message", "field", "enum", "enum_value"), 0)
    for kind, *_ in walk(fds):
        seen[kind] += 1
    assert all(seen.values()), f"walker found no element of some kind: {seen}"
    assert seen["service"] >= 6 and seen["rpc"] >= 10, seen


def test_package_matches_directory(fds):
    bad = package_violations(fds)
    assert not bad, "package does not match directory:\n" + "\n".join(bad)


def test_enum_zero_value_is_unspecified(fds):
    bad = enum_zero_violations(fds)
    assert not bad, "enum zero values not named <ENUM_UPPER_SNAKE>_UNSPECIFIED:\n" + "\n".join(bad)


def test_enum_values_prefixed_with_enum_name(fds):
    bad = enum_prefix_violations(fds)
    assert not bad, "enum values without the enum's UPPER_SNAKE prefix:\n" + "\n".join(bad)


def test_rpc_request_response_types(fds):
    bad = rpc_type_violations(fds)
    assert not bad, "RPC request/response types:\n" + "\n".join(bad)


def test_every_element_has_a_leading_comment(fds):
    bad = comment_violations(fds)
    assert not bad, "elements without a leading comment:\n" + "\n".join(bad)


PROBE = """\
syntax = "proto3";
// Documented.
package other.v2;

// Documented.
service ProbeService {
  // Documented.
  rpc Ping(PingRequest) returns (PingResponse);
  // Shares Ping's request; wrong response name.
  rpc Pong(PingRequest) returns (PongReply);
  rpc Undocumented(UndocumentedRequest) returns (UndocumentedResponse);
}

// Documented.
message PingRequest {
  // Documented.
  int32 a = 1;
  int32 b = 2;
  // Documented; the synthetic map entry is not reported.
  map<string, int32> m = 3;
}
// Documented.
message PingResponse {}
// Documented.
message PongReply {}
// Documented.
message UndocumentedRequest {}
// Documented.
message UndocumentedResponse {}

// Documented.
enum HTTPMethod {
  // Documented.
  HTTP_METHOD_UNSPECIFIED = 0;
  // Documented.
  HTTPMETHOD_GET = 1;
  METHOD_POST = 2;
}

// Documented.
enum Color {
  // Documented.
  UNKNOWN = 0;
  // Documented.
  COLOR_RED = 1;
}
"""


def test_rules_detect_violations(tmp_path):
    # Each rule, on a probe proto with known faults: guards against rules or
    # a walker that silently check nothing.
    d = tmp_path / "alignd" / "v1"
    d.mkdir(parents=True)
    (d / "probe.proto").write_text(PROBE)
    s = compile_descriptors(tmp_path, [d / "probe.proto"], tmp_path / "probe.binpb")
    assert package_violations(s) == [
        "alignd/v1/probe.proto: package 'other.v2' (directory 'alignd.v1', expected 'alignd.v1')"
    ]
    assert enum_zero_violations(s) == ["other.v2.Color: zero value ['UNKNOWN'], expected COLOR_UNSPECIFIED"]
    assert enum_prefix_violations(s) == [
        "other.v2.HTTPMethod.HTTPMETHOD_GET (expected prefix HTTP_METHOD_)",
        "other.v2.HTTPMethod.METHOD_POST (expected prefix HTTP_METHOD_)",
        "other.v2.Color.UNKNOWN (expected prefix COLOR_)",
    ]
    assert rpc_type_violations(s) == [
        "other.v2.ProbeService.Pong: request type other.v2.PingRequest, expected other.v2.PongRequest",
        "other.v2.ProbeService.Pong: response type other.v2.PongReply, expected other.v2.PongResponse",
        "other.v2.PingRequest is used by several RPCs: other.v2.ProbeService.Ping (request), "
        "other.v2.ProbeService.Pong (request)",
    ]
    assert comment_violations(s) == [
        "field other.v2.PingRequest.b: no leading comment",
        "enum_value other.v2.HTTPMethod.METHOD_POST: no leading comment",
        "rpc other.v2.ProbeService.Undocumented: no leading comment",
    ]


def test_proto_files_are_proto3_without_tabs():
    # Cheap text checks the descriptor does not express.
    bad = []
    for p in sorted(PROTO_DIR.glob("*.proto")):
        text = p.read_text()
        if not re.search(r'^syntax = "proto3";$', text, re.M):
            bad.append(f"{p.name}: not proto3")
        if "\t" in text:
            bad.append(f"{p.name}: contains tabs")
    assert not bad, bad
