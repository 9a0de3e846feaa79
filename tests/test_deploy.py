"""deploy/archiver.yaml: least-privilege task role, every setting wired, shutdown, queues, bucket, scaling."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import botocore.session
import botocore.validate
import pytest
import yaml

from archiver import metrics as emf
from archiver import worker
from archiver.cli import OFFLOAD_PREFIX
from archiver.errors import SettingsError
from archiver.models import Request, archive_key
from archiver.settings import Settings, load_settings
from archiver.status import status_key
from tests.test_iam import KMS_NEEDED

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ACCOUNT = "123456789012"
REGION = "eu-west-1"
NO_VALUE = object()  # AWS::NoValue: the property or list item disappears
PSEUDO = {
    "AWS::AccountId": ACCOUNT,
    "AWS::Region": REGION,
    "AWS::Partition": "aws",
    "AWS::StackName": "archiver",
    "AWS::URLSuffix": "amazonaws.com",
}
DISTRIBUTION = "archiver-distribution-1a2b3c"
REQUIRED = {"ContainerImage": "archiver:test", "SourceBucket": "source-images"}
KMS_KEYS = {
    "SourceKmsKeyArns": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1111aaaa-0000-0000-0000-000000000001,"
    f"arn:aws:kms:{REGION}:{ACCOUNT}:key/mrk-2222bbbb000000000000000000000002",
    "ArchiveKmsKeyArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/3333cccc-0000-0000-0000-000000000003",
}
TARGETS = {
    "NotifyTopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:archives",
    "NotifyEventBusArn": f"arn:aws:events:{REGION}:{ACCOUNT}:event-bus/archives",
}


# ------------------------------------------------------------------------------------------- loading


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags, read into their long forms (`!Sub x` -> {"Fn::Sub": x})."""


def _short_tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "Condition":
        return {"Condition": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _short_tag)


@functools.cache
def template() -> dict[str, Any]:
    with (DEPLOY / "archiver.yaml").open() as stream:
        loaded: dict[str, Any] = yaml.load(stream, Loader=CfnLoader)  # a SafeLoader subclass
    return loaded


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template()["Resources"].items() if res["Type"] == kind}


def container() -> dict[str, Any]:
    (task,) = resources("AWS::ECS::TaskDefinition").values()
    (definition,) = task["Properties"]["ContainerDefinitions"]
    return dict(definition)


def environment() -> dict[str, Any]:
    return {item["Name"]: item["Value"] for item in container()["Environment"]}


def task_role_statements(**overrides: Any) -> list[dict[str, Any]]:
    """The task role's statements as they are for these parameters (conditional ones dropped or kept)."""
    (task,) = resources("AWS::ECS::TaskDefinition").values()
    role_name = task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
    role = template()["Resources"][role_name]
    assert role["Type"] == "AWS::IAM::Role"
    assert "ManagedPolicyArns" not in role["Properties"], "the task role's grants are all inline"
    statements: list[dict[str, Any]] = Resolver(**overrides)(
        [
            statement
            for policy in role["Properties"]["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
        ]
    )
    return statements


def declared_actions(*services: str) -> set[str]:
    listed = json.loads((DEPLOY / "worker-actions.json").read_text())
    assert set(listed) == {"s3", "sqs", "ecs", "kms", "sns", "events"}
    actions = {action for service in services or listed for action in listed[service]}
    assert all(action.split(":")[0] == service for service, group in listed.items() for action in group)
    return actions


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------------------------------- resolving


class Resolver:
    """Evaluates the template's intrinsic functions for given parameter values, with made-up physical
    names for resources, so that policies and the container environment can be checked as plain values."""

    def __init__(self, **overrides: Any) -> None:
        self.params: dict[str, Any] = {}
        for name, spec in template()["Parameters"].items():
            value = overrides.get(name, spec.get("Default", REQUIRED.get(name)))
            if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
                value = value.split(",")
            self.params[name] = value if isinstance(value, list) else str(value)

    def condition(self, name: str) -> bool:
        return bool(self(template()["Conditions"][name]))

    def physical(self, logical: str) -> str:
        resource = template()["Resources"][logical]
        assert "Condition" not in resource or self.condition(resource["Condition"]), (
            f"{logical} is not created"
        )
        return f"archiver-{logical.lower()}-1a2b3c"

    def ref(self, name: str) -> Any:
        if name in PSEUDO:
            return PSEUDO[name]
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.params:
            return self.params[name]
        physical = self.physical(name)
        if template()["Resources"][name]["Type"] == "AWS::SQS::Queue":
            return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{physical}"
        return physical

    def attribute(self, logical: str, attribute: str) -> str:
        physical = self.physical(logical)
        known = {
            ("AWS::S3::Bucket", "Arn"): f"arn:aws:s3:::{physical}",
            ("AWS::SQS::Queue", "Arn"): f"arn:aws:sqs:{REGION}:{ACCOUNT}:{physical}",
            ("AWS::SQS::Queue", "QueueName"): physical,
            ("AWS::CloudFront::Distribution", "DomainName"): "d111111abcdef8.cloudfront.net",
        }
        return known.get((template()["Resources"][logical]["Type"], attribute), f"{physical}.{attribute}")

    def sub(self, text: str, variables: dict[str, Any]) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return str(self(variables[name]))
            if "." in name and name not in PSEUDO:
                return self.attribute(*name.split(".", 1))
            return str(self.ref(name))

        return re.sub(r"\$\{([^}!]+)\}", one, text)

    def __call__(self, node: Any) -> Any:
        if isinstance(node, list):
            return [item for item in (self(item) for item in node) if item is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::GetAtt":
                return self.attribute(*arg)
            if key == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else arg
                return self.sub(text, variables)
            if key == "Fn::Join":
                return arg[0].join(str(item) for item in self(arg[1]))
            if key == "Fn::Split":
                return str(self(arg[1])).split(arg[0])
            if key == "Fn::If":
                return self(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                return self(arg[0]) == self(arg[1])
            if key == "Fn::Contains":  # Rules only
                return self(arg[1]) in self(arg[0])
            if key == "Fn::Not":
                return not self(arg[0])
            if key == "Fn::And":
                return all(self(item) for item in arg)
            if key == "Fn::Or":
                return any(self(item) for item in arg)
            if key == "Fn::FindInMap":
                name, top, second = (self(part) for part in arg)
                return template()["Mappings"][name][top][second]
        return {key: value for key, value in ((k, self(v)) for k, v in node.items()) if value is not NO_VALUE}


def resolved_environment(**overrides: Any) -> dict[str, str]:
    resolve = Resolver(**overrides)
    return {item["Name"]: str(resolve(item["Value"])) for item in container()["Environment"]}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings from exactly this environment, as the container would read them."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def grants(**overrides: Any) -> dict[str, set[str]]:
    """Action -> the concrete resources the task role grants it on."""
    granted: dict[str, set[str]] = {}
    for statement in task_role_statements(**overrides):
        for action in as_list(statement["Action"]):
            granted.setdefault(action, set()).update(as_list(statement["Resource"]))
    return granted


# ------------------------------------------------------------------------------------------- IAM


def test_task_role_grants_exactly_the_declared_actions() -> None:
    """The task role allows exactly the union of deploy/worker-actions.json, its KMS actions only when
    KMS keys are given (with SSE-S3, S3 asks nothing of the caller), SNS and EventBridge only when those
    notification targets are."""
    base = ("s3", "sqs", "ecs")
    for overrides, services in (
        ({}, base),
        (KMS_KEYS, (*base, "kms")),
        (TARGETS, (*base, "sns", "events")),
        ({"NotifyTopicArn": TARGETS["NotifyTopicArn"]}, (*base, "sns")),
        ({**KMS_KEYS, **TARGETS}, ()),
    ):
        statements = task_role_statements(**overrides)
        granted = {action for statement in statements for action in as_list(statement["Action"])}
        assert granted == declared_actions(*services), overrides


@pytest.mark.parametrize("kms", [{}, KMS_KEYS, TARGETS], ids=["sse-s3", "sse-kms", "targets"])
def test_task_role_has_no_wildcards_or_exceptions(kms: dict[str, str]) -> None:
    """Every task-role statement is a plain Allow of named actions on named resources, no `*`."""
    for allowed_sources in ([""], ["partner-images", "more-images"]):
        for statement in task_role_statements(AllowedSourceBuckets=allowed_sources, **kms):
            assert statement["Effect"] == "Allow"
            assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
            assert not any("*" in action for action in as_list(statement["Action"])), statement["Sid"]
            for resource in as_list(statement["Resource"]):
                assert resource != "*" and not resource.startswith("arn:aws:s3:::*"), statement["Sid"]
                assert ":::/" not in resource, f"{statement['Sid']}: an empty bucket name in {resource}"
                assert resource.startswith("arn:aws:"), f"{statement['Sid']}: {resource}"


def test_kms_keys_are_used_only_through_s3_and_only_when_given() -> None:
    """Source keys may Decrypt, the archive key GenerateDataKey and Decrypt, each only via S3 in the
    region, matching what the worker's recorded S3 calls need (tests/test_iam.py); the archive bucket
    encrypts with its key when one is given."""
    source_keys = set(KMS_KEYS["SourceKmsKeyArns"].split(","))
    archive_key = KMS_KEYS["ArchiveKmsKeyArn"]
    keys = {"source": source_keys, "archive": {archive_key}}
    expected: dict[str, set[str]] = {}
    for action, side in KMS_NEEDED:
        expected.setdefault(action, set()).update(keys[side])
    assert {a: r for a, r in grants(**KMS_KEYS).items() if a.startswith("kms:")} == expected
    assert not any(a.startswith("kms:") for a in grants())
    only_sources = grants(SourceKmsKeyArns=KMS_KEYS["SourceKmsKeyArns"])
    assert {a: r for a, r in only_sources.items() if a.startswith("kms:")} == {"kms:Decrypt": source_keys}
    for statement in task_role_statements(**KMS_KEYS):
        if any(action.startswith("kms:") for action in as_list(statement["Action"])):
            assert statement["Condition"] == {
                "StringEquals": {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}
            }

    (bucket,) = resources("AWS::S3::Bucket").values()
    encryption = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert Resolver(ArchiveKmsKeyArn=archive_key)(encryption) == [
        {
            "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": archive_key},
            "BucketKeyEnabled": True,
        }
    ]
    assert Resolver()(encryption) == [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]


@pytest.mark.parametrize("allowed", [[""], ["partner-images", "more-images"]], ids=["no-extra", "two-extra"])
def test_task_role_resources_are_the_buckets_prefix_and_queues(allowed: list[str]) -> None:
    """Archive writes stay under FilePrefix/, sources are read-only, each queue gets its own actions."""
    archive = "arn:aws:s3:::archiver-archivebucket-1a2b3c"
    sources = {f"arn:aws:s3:::{bucket}" for bucket in ["source-images", *allowed] if bucket}
    source_queue = f"arn:aws:sqs:{REGION}:{ACCOUNT}:archiver-sourcequeue-1a2b3c"
    destination_queue = f"arn:aws:sqs:{REGION}:{ACCOUNT}:archiver-destinationqueue-1a2b3c"
    archive_objects = {f"{archive}/download/*"}
    assert grants(AllowedSourceBuckets=allowed) == {
        "s3:GetObject": {f"{bucket}/*" for bucket in sources} | archive_objects,
        "s3:ListBucket": sources | {archive},
        "s3:PutObject": archive_objects,
        "s3:AbortMultipartUpload": archive_objects,
        "s3:DeleteObject": archive_objects,
        "s3:ListBucketMultipartUploads": {archive},
        "sqs:ReceiveMessage": {source_queue},
        "sqs:DeleteMessage": {source_queue},
        "sqs:ChangeMessageVisibility": {source_queue},
        "sqs:GetQueueAttributes": {source_queue},
        "sqs:GetQueueUrl": {source_queue, destination_queue},
        "sqs:SendMessage": {source_queue, destination_queue},
        "ecs:UpdateTaskProtection": {f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/archiver-cluster-1a2b3c/*"},
    }
    assert grants(AllowedSourceBuckets=allowed, FilePrefix="exports/zips")["s3:PutObject"] == {
        f"{archive}/exports/zips/*"
    }


def test_notification_targets_are_granted_only_on_themselves_and_reach_the_container() -> None:
    """sns:Publish on the topic and events:PutEvents on the bus, each only when given; the container
    gets them as NOTIFY_SNS_TOPIC_ARN and NOTIFY_EVENT_BUS (empty, which the worker reads as unset)."""
    granted = grants(**TARGETS)
    assert granted["sns:Publish"] == {TARGETS["NotifyTopicArn"]}
    assert granted["events:PutEvents"] == {TARGETS["NotifyEventBusArn"]}
    assert not {"sns:Publish", "events:PutEvents"} & set(grants())
    environment = {item["Name"]: item["Value"] for item in container()["Environment"]}
    assert environment["NOTIFY_SNS_TOPIC_ARN"] == {"Ref": "NotifyTopicArn"}
    assert environment["NOTIFY_EVENT_BUS"] == {"Ref": "NotifyEventBusArn"}


def test_task_role_is_assumable_only_by_this_accounts_ecs_tasks() -> None:
    """Only this account's ECS tasks may assume the task role (confused-deputy guard)."""
    (task,) = resources("AWS::ECS::TaskDefinition").values()
    role = template()["Resources"][task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]]
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}


# ------------------------------------------------------------------------------------------- container


def test_every_setting_is_in_the_container_environment() -> None:
    """Every Settings field, upper-cased, is in the container environment, plus AWS_REGION only."""
    names = [item["Name"] for item in container()["Environment"]]
    assert len(names) == len(set(names))
    assert set(names) == {name.upper() for name in Settings.model_fields} | {"AWS_REGION"}


@pytest.mark.parametrize("cloudfront", ["false", "true"])
def test_default_parameters_make_valid_settings(cloudfront: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default parameters give an environment the worker loads, with CloudFront as base URL if on."""
    env = resolved_environment(EnableCloudFront=cloudfront)
    settings = settings_from(env, monkeypatch)
    assert settings.sqs_source_queue.endswith("/archiver-sourcequeue-1a2b3c")
    assert settings.s3_destination_bucket == "archiver-archivebucket-1a2b3c"
    assert settings.expected_bucket_owner == ACCOUNT
    assert settings.source_buckets == frozenset({"source-images"})
    assert settings.archive_base_url == (
        "https://d111111abcdef8.cloudfront.net" if cloudfront == "true" else None
    )
    assert (settings.shutdown_grace, settings.visibility_timeout, settings.health_file) == (
        25,
        120,
        "/tmp/archiver.heartbeat",
    )
    assert not settings.app_debug and not settings.dev_mode
    assert env["AWS_REGION"] == REGION
    assert settings_from(
        resolved_environment(AllowedSourceBuckets="partner-images,more-images"), monkeypatch
    ).source_buckets == frozenset({"source-images", "partner-images", "more-images"})


def test_parameter_bounds_are_the_workers_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each setting's Number parameter bounds are exactly where the worker starts refusing values."""
    wired = {
        value["Ref"]: name
        for name, value in environment().items()
        if isinstance(value, dict) and value.get("Ref") in template()["Parameters"]
    }
    checked = 0
    for parameter, variable in wired.items():
        spec = template()["Parameters"][parameter]
        if spec["Type"] != "Number":
            continue
        for bound, step in (("MinValue", -1), ("MaxValue", 1)):
            if bound not in spec:
                continue
            checked += 1
            settings_from(resolved_environment(**{parameter: spec[bound]}), monkeypatch)
            with pytest.raises(SettingsError, match=variable):
                settings_from(resolved_environment(**{parameter: spec[bound] + step}), monkeypatch)
    assert checked >= 10


def test_stop_timeout_is_shutdown_grace_plus_five() -> None:
    """stopTimeout is SHUTDOWN_GRACE + 5 for every allowed ShutdownGrace (30 by default), <= 120."""
    assert container()["StopTimeout"] == {
        "Fn::FindInMap": ["StopTimeouts", {"Ref": "ShutdownGrace"}, "Seconds"]
    }
    assert environment()["SHUTDOWN_GRACE"] == {"Ref": "ShutdownGrace"}
    grace = template()["Parameters"]["ShutdownGrace"]
    mapping = template()["Mappings"]["StopTimeouts"]
    assert set(mapping) == set(grace["AllowedValues"])
    for value in grace["AllowedValues"]:
        assert mapping[value] == {"Seconds": int(value) + 5}
        assert int(value) + 5 <= 120
    assert Resolver()(container()["StopTimeout"]) == 30


def test_health_check_runs_archiver_check() -> None:
    """The container health check is `archiver check` with the Dockerfile's own HEALTHCHECK timings."""
    dockerfile = (Path(__file__).parent.parent / "Dockerfile").read_text(encoding="utf-8")
    line = next(row for row in dockerfile.splitlines() if row.startswith("HEALTHCHECK"))
    options = dict(re.findall(r"--([a-z-]+)=(\d+)s?", line))
    assert container()["HealthCheck"] == {
        "Command": ["CMD", "archiver", "check"],
        "Interval": int(options["interval"]),
        "Timeout": int(options["timeout"]),
        "Retries": int(options["retries"]),
        "StartPeriod": int(options["start-period"]),
    }


def test_deploy_readme_states_the_templates_health_check_and_parameters() -> None:
    """deploy/README.md gives the health check's real timings and names every parameter."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    found = re.search(r"every (\d+) s, timeout (\d+) s, (\d+) retries, (\d+) s start period", text)
    assert found, "the Health check bullet"
    check = container()["HealthCheck"]
    assert tuple(int(n) for n in found.groups()) == (
        check["Interval"],
        check["Timeout"],
        check["Retries"],
        check["StartPeriod"],
    )
    missing = [name for name in template()["Parameters"] if f"`{name}`" not in text]
    assert missing == []


def test_logs_never_block_the_worker() -> None:
    """awslogs runs in non-blocking mode with a bounded buffer into a log group with a retention."""
    logging = container()["LogConfiguration"]
    assert logging["LogDriver"] == "awslogs"
    assert logging["Options"]["mode"] == "non-blocking"
    assert re.fullmatch(r"\d+[km]", logging["Options"]["max-buffer-size"])
    group = template()["Resources"][logging["Options"]["awslogs-group"]["Ref"]]
    assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_service_rolls_back_failed_deployments() -> None:
    """The service has a rollback circuit breaker, Fargate capacity providers, no fixed DesiredCount."""
    (service,) = resources("AWS::ECS::Service").values()
    properties = service["Properties"]
    assert properties["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {
        "Enable": True,
        "Rollback": True,
    }
    assert [item["CapacityProvider"] for item in properties["CapacityProviderStrategy"]] == [
        "FARGATE",
        "FARGATE_SPOT",
    ]
    assert "DesiredCount" not in properties and "LaunchType" not in properties


# ------------------------------------------------------------------------------------------- queues, bucket


def test_source_queue_redrives_to_a_long_lived_kept_dlq() -> None:
    """The source queue redrives to a 14-day DLQ that outlives the stack; all queues use SSE."""
    queues = resources("AWS::SQS::Queue")
    source = queues["SourceQueue"]["Properties"]
    assert source["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
        "maxReceiveCount": {"Ref": "MaxReceiveCount"},
    }
    dlq = queues["DeadLetterQueue"]
    assert dlq["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    # It can hold the only copy of failed requests.
    assert (dlq["DeletionPolicy"], dlq["UpdateReplacePolicy"]) == ("Retain", "Retain")
    assert source["VisibilityTimeout"] == environment()["VISIBILITY_TIMEOUT"] == {"Ref": "VisibilityTimeout"}
    assert source["MessageRetentionPeriod"] < dlq["Properties"]["MessageRetentionPeriod"]
    assert all(queue["Properties"]["SqsManagedSseEnabled"] is True for queue in queues.values())


def test_max_receive_count_is_the_retries_of_a_failing_request() -> None:
    """MaxReceiveCount counts the attempts of a request that keeps failing, not a job's length: at the
    defaults the worker's backoff gets it to the DLQ, and its producer a `failed` notice, within minutes
    (busy duplicates are deferred and, on their last delivery, deleted: tests/test_leases.py)."""
    parameters = template()["Parameters"]
    count, visibility = parameters["MaxReceiveCount"]["Default"], parameters["VisibilityTimeout"]["Default"]
    assert 3 <= count <= 5
    waited = sum(worker.release_delay(n, visibility) for n in range(1, count))
    assert waited <= 5 * 60
    assert "deferred" in parameters["MaxReceiveCount"]["Description"]
    assert parameters["MaxReceiveCount"]["MaxValue"] == 1000  # SQS's own limit


def test_source_queue_message_size_is_explicit() -> None:
    """MaximumMessageSize, which `archiver submit` reads to decide on offloading, is set, not SQS's
    default of the day, and within SQS's limit."""
    source = resources("AWS::SQS::Queue")["SourceQueue"]["Properties"]
    assert source["MaximumMessageSize"] == 1024 * 1024


def test_offloaded_request_bodies_expire_after_the_queues_let_go() -> None:
    """deploy/offload-lifecycle.json is a valid lifecycle configuration that expires what `archiver
    submit` offloads, and only after the source queue and the DLQ can no longer hold its pointer."""
    configuration = json.loads((DEPLOY / "offload-lifecycle.json").read_text())
    operation = (
        botocore.session.get_session()
        .get_service_model("s3")
        .operation_model("PutBucketLifecycleConfiguration")
    )
    botocore.validate.validate_parameters(
        {"Bucket": "source-images", "LifecycleConfiguration": configuration}, operation.input_shape
    )
    (rule,) = configuration["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["Filter"] == {"Prefix": f"{OFFLOAD_PREFIX}/"}
    queues = resources("AWS::SQS::Queue")
    # A redriven message starts a new retention period in the source queue.
    held = sum(queues[q]["Properties"]["MessageRetentionPeriod"] for q in ("SourceQueue", "DeadLetterQueue"))
    assert rule["Expiration"]["Days"] * 86400 > held


def test_archive_bucket_is_private_encrypted_and_cleans_up() -> None:
    """The archive bucket is private, SSE-S3, aborts stale uploads after 1 day, expires the prefix."""
    (bucket,) = resources("AWS::S3::Bucket").values()
    properties = bucket["Properties"]
    assert set(properties["PublicAccessBlockConfiguration"].values()) == {True}
    assert properties["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    (encryption,) = Resolver()(properties["BucketEncryption"]["ServerSideEncryptionConfiguration"])
    assert encryption["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    rules = {rule["Id"]: rule for rule in properties["LifecycleConfiguration"]["Rules"]}
    abort = rules["AbortIncompleteMultipartUploads"]
    assert abort["Status"] == "Enabled" and "Prefix" not in abort
    assert abort["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    expire = rules["ExpireArchives"]
    assert expire["Status"] == "Enabled"
    assert expire["ExpirationInDays"] == {"Ref": "ArchiveExpirationDays"}
    assert Resolver()(expire["Prefix"]) == "download/"


def arn_matches(pattern: str, arn: str) -> bool:
    """IAM's Resource matching: `*` is any run of characters, `/` included; `?` is one; case counts."""
    parts = (".".join(re.escape(piece) for piece in part.split("?")) for part in pattern.split("*"))
    return re.fullmatch(".*".join(parts), arn) is not None


def cloudfront_may_read(statements: list[dict[str, Any]], key: str) -> bool:
    """Whether this stack's distribution may GetObject `key` of the archive bucket: an Allow that
    matches and no Deny that does."""
    arn = f"arn:aws:s3:::archiver-archivebucket-1a2b3c/{key}"
    ours = f"arn:aws:cloudfront::{ACCOUNT}:distribution/{DISTRIBUTION}"
    decisions = set()
    for statement in statements:
        if statement.get("Principal") not in ("*", {"Service": "cloudfront.amazonaws.com"}):
            continue
        if not any(arn_matches(a, "s3:GetObject") for a in as_list(statement["Action"])):
            continue
        if not any(arn_matches(r, arn) for r in as_list(statement["Resource"])):
            continue
        condition = statement.get("Condition", {})
        if condition and condition != {"StringEquals": {"AWS:SourceArn": ours}}:
            continue  # e.g. DenyInsecureTransport: CloudFront's origin requests are HTTPS
        decisions.add(statement["Effect"])
    return decisions == {"Allow"}


def test_cloudfront_reads_archives_only_and_only_when_enabled() -> None:
    """Only when enabled may the distribution read, only under FilePrefix/, and never a status.json,
    whatever name a request gives its archive."""
    (policy,) = resources("AWS::S3::BucketPolicy").values()

    def statements(cloudfront: str) -> list[dict[str, Any]]:
        resolved: list[dict[str, Any]] = Resolver(EnableCloudFront=cloudfront)(
            policy["Properties"]["PolicyDocument"]["Statement"]
        )
        return resolved

    names = ["photos.zip", "report.tar.gz", "data", "status.json.zip", "my status.json", "Status.json.bak"]
    for name in names:  # names a request may give, so archives the distribution must serve
        Request.model_validate({"files": [{"source": "a"}], "archive_name": name})
    for name in ("status.json", "STATUS.JSON"):
        with pytest.raises(ValueError, match="reserved"):
            Request.model_validate({"files": [{"source": "a"}], "archive_name": name})
    archives = [archive_key("download", "order-1234", name) for name in [*names, "order-1234.zip"]]
    enabled, disabled = statements("true"), statements("false")
    for key in archives:
        assert cloudfront_may_read(enabled, key), key
        assert not cloudfront_may_read(disabled, key), key
        assert not cloudfront_may_read(enabled, status_key(key)), status_key(key)
    assert not cloudfront_may_read(enabled, "elsewhere/order-1234/photos.zip")
    assert not cloudfront_may_read(enabled, "download.zip")
    assert resources("AWS::CloudFront::Distribution")["Distribution"]["Condition"] == "UseCloudFront"


# ------------------------------------------------------------------------------------------- scaling, alarms


def metric_names(metrics: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {
        m["Id"]: (m["MetricStat"]["Metric"]["Namespace"], m["MetricStat"]["Metric"]["MetricName"])
        for m in metrics
        if "MetricStat" in m
    }


def test_target_tracking_holds_backlog_per_task() -> None:
    """Target tracking holds visible messages / RunningTaskCount at BacklogPerTask, tasks 0..MaxTasks."""
    (target,) = resources("AWS::ApplicationAutoScaling::ScalableTarget").values()
    assert target["Properties"]["MinCapacity"] == 0
    assert target["Properties"]["MaxCapacity"] == {"Ref": "MaxTasks"}
    (tracking,) = [
        p
        for p in resources("AWS::ApplicationAutoScaling::ScalingPolicy").values()
        if p["Properties"]["PolicyType"] == "TargetTrackingScaling"
    ]
    configuration = tracking["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert configuration["TargetValue"] == {"Ref": "BacklogPerTask"}
    backlog = template()["Parameters"]["BacklogPerTask"]
    assert backlog["Default"] == 2
    # Long jobs need targets below 1 (acceptable wait / time per request); target tracking takes floats.
    assert backlog["Type"] == "Number" and 0 < backlog["MinValue"] <= 0.01
    metrics = configuration["CustomizedMetricSpecification"]["Metrics"]
    assert metric_names(metrics) == {
        "visible": ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        "running": ("ECS/ContainerInsights", "RunningTaskCount"),
    }
    (returned,) = [m for m in metrics if m["ReturnData"]]
    assert returned["Expression"] == "visible / running"
    resolve = Resolver()
    dimensions = {
        m["Id"]: resolve(m["MetricStat"]["Metric"]["Dimensions"]) for m in metrics if "MetricStat" in m
    }
    assert dimensions["visible"] == [{"Name": "QueueName", "Value": "archiver-sourcequeue-1a2b3c"}]
    assert dimensions["running"] == [
        {"Name": "ClusterName", "Value": "archiver-cluster-1a2b3c"},
        {"Name": "ServiceName", "Value": "archiver-service-1a2b3c.Name"},
    ]
    (cluster,) = resources("AWS::ECS::Cluster").values()
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["Properties"]["ClusterSettings"]


def test_step_policy_scales_from_zero_on_waiting_messages() -> None:
    """A step policy adds 1 task (never sets a count) when messages are visible and the service wants
    no task, so a stale metric can add a task but never shrink a busy service."""
    (step_name,) = [
        name
        for name, p in resources("AWS::ApplicationAutoScaling::ScalingPolicy").items()
        if p["Properties"]["PolicyType"] == "StepScaling"
    ]
    configuration = template()["Resources"][step_name]["Properties"]["StepScalingPolicyConfiguration"]
    assert configuration["AdjustmentType"] == "ChangeInCapacity"
    assert configuration["StepAdjustments"] == [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]
    (alarm,) = [
        a
        for a in resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("AlarmActions") == [{"Ref": step_name}]
    ]
    properties = alarm["Properties"]
    assert (properties["ComparisonOperator"], properties["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
    assert metric_names(properties["Metrics"]) == {
        "visible": ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        "desired": ("ECS/ContainerInsights", "DesiredTaskCount"),
    }
    (returned,) = [m for m in properties["Metrics"] if m["ReturnData"]]
    assert returned["Expression"] == "IF(FILL(desired, 0) == 0, visible, 0)"


def alarms() -> dict[str, dict[str, Any]]:
    """The operators' alarms, by logical name (not the one that starts the first task)."""
    return {
        name: alarm["Properties"]
        for name, alarm in resources("AWS::CloudWatch::Alarm").items()
        if not any(
            template()["Resources"]
            .get(action.get("Ref", ""), {})
            .get("Type", "")
            .startswith("AWS::Application")
            for action in alarm["Properties"]["AlarmActions"]
            if isinstance(action, dict)
        )
    }


def rule_holds(rule: dict[str, Any], **overrides: Any) -> bool:
    resolve = Resolver(**overrides)
    if "RuleCondition" in rule and not resolve(rule["RuleCondition"]):
        return True
    return all(resolve(assertion["Assert"]) for assertion in rule["Assertions"])


def test_every_alarm_notifies_a_topic() -> None:
    """Every alarm notifies AlarmTopicArn, or a topic the stack creates when it is empty (with an
    optional email subscription, refused next to AlarmTopicArn): no alarm without an action."""
    ops = f"arn:aws:sns:{REGION}:{ACCOUNT}:ops"
    assert set(alarms()) == {
        "DeadLetterQueueAlarm",
        "OldestMessageAlarm",
        "NotificationAgeAlarm",
        "TasksNotRunningAlarm",
        "FailedRequestsAlarm",
    }
    for name, alarm in alarms().items():
        for actions in ("AlarmActions", "OKActions"):
            assert Resolver(AlarmTopicArn=ops)(alarm[actions]) == [ops], name
            assert Resolver()(alarm[actions]) == ["archiver-alarmtopic-1a2b3c"], name
    topic = resources("AWS::SNS::Topic")["AlarmTopic"]
    assert Resolver().condition(topic["Condition"]) and not Resolver(AlarmTopicArn=ops).condition(
        topic["Condition"]
    )
    (subscription,) = resources("AWS::SNS::Subscription").values()
    assert Resolver(AlarmEmail="ops@example.com")(subscription["Properties"]) == {
        "TopicArn": "archiver-alarmtopic-1a2b3c",
        "Protocol": "email",
        "Endpoint": "ops@example.com",
    }
    assert not Resolver().condition(subscription["Condition"])
    rule = template()["Rules"]["AlarmEmailNeedsOwnTopic"]
    assert rule_holds(rule) and rule_holds(rule, AlarmEmail="ops@example.com")
    assert rule_holds(rule, AlarmTopicArn=ops)
    assert not rule_holds(rule, AlarmTopicArn=ops, AlarmEmail="ops@example.com")
    assert Resolver()(template()["Outputs"]["AlarmTopicArn"]["Value"]) == "archiver-alarmtopic-1a2b3c"


def test_dlq_alarm_fires_on_any_message() -> None:
    """Any message in the dead-letter queue alarms."""
    dlq = alarms()["DeadLetterQueueAlarm"]
    assert (dlq["Namespace"], dlq["MetricName"]) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
    assert Resolver()(dlq["Dimensions"]) == [
        {"Name": "QueueName", "Value": "archiver-deadletterqueue-1a2b3c"}
    ]
    assert (dlq["ComparisonOperator"], dlq["Threshold"]) == ("GreaterThanThreshold", 0)


@pytest.mark.parametrize("job_timeout", [None, 600, 43199])
def test_oldest_request_alarm_allows_for_the_longest_job(job_timeout: int | None) -> None:
    """The source queue's age alarm fires at JobTimeout + OldestMessageAgeMargin, never below
    JobTimeout: a request being worked on counts, so a fixed threshold would fire on long jobs."""
    alarm = alarms()["OldestMessageAlarm"]
    overrides = {} if job_timeout is None else {"JobTimeout": job_timeout}
    job_timeout = job_timeout or template()["Parameters"]["JobTimeout"]["Default"]
    resolve = Resolver(**overrides)
    metrics = {m["Id"]: m for m in resolve(alarm["Metrics"])}
    assert metric_names(list(metrics.values())) == {"age": ("AWS/SQS", "ApproximateAgeOfOldestMessage")}
    assert metrics["age"]["MetricStat"]["Metric"]["Dimensions"] == [
        {"Name": "QueueName", "Value": "archiver-sourcequeue-1a2b3c"}
    ]
    (returned,) = [m for m in metrics.values() if m["ReturnData"]]
    assert returned["Expression"] == f"age - {job_timeout}"
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == {"Ref": "OldestMessageAgeMargin"}
    assert template()["Parameters"]["OldestMessageAgeMargin"]["MinValue"] > 0


def test_notification_age_alarm_watches_the_destination_queue() -> None:
    """Notifications left unread longer than NotificationAgeThreshold alarm."""
    alarm = alarms()["NotificationAgeAlarm"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/SQS", "ApproximateAgeOfOldestMessage")
    assert Resolver()(alarm["Dimensions"]) == [
        {"Name": "QueueName", "Value": "archiver-destinationqueue-1a2b3c"}
    ]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == (
        "GreaterThanThreshold",
        {"Ref": "NotificationAgeThreshold"},
    )


def test_tasks_not_running_alarm_outlasts_a_normal_start() -> None:
    """Tasks the service wants but that do not run (failing health checks, crashing, not starting)
    alarm once that lasts longer than a health check takes to fail and a task to start again."""
    alarm = alarms()["TasksNotRunningAlarm"]
    metrics = alarm["Metrics"]
    assert metric_names(metrics) == {
        "desired": ("ECS/ContainerInsights", "DesiredTaskCount"),
        "running": ("ECS/ContainerInsights", "RunningTaskCount"),
    }
    for metric in metrics:
        if "MetricStat" in metric:
            assert Resolver()(metric["MetricStat"]["Metric"]["Dimensions"]) == [
                {"Name": "ClusterName", "Value": "archiver-cluster-1a2b3c"},
                {"Name": "ServiceName", "Value": "archiver-service-1a2b3c.Name"},
            ]
    (returned,) = [m for m in metrics if m["ReturnData"]]
    assert returned["Expression"] == "FILL(desired, 0) - FILL(running, 0)"
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
    check = container()["HealthCheck"]
    declared_unhealthy = check["StartPeriod"] + check["Interval"] * check["Retries"]
    assert alarm["DatapointsToAlarm"] * 60 > 2 * declared_unhealthy
    assert alarm["EvaluationPeriods"] >= alarm["DatapointsToAlarm"]


def test_failed_requests_alarm_reads_the_workers_emf_metric(capsys: pytest.CaptureFixture[str]) -> None:
    """The failed-requests alarm watches the metric the worker's EMF line really creates."""
    emf.emit_request(
        outcome="failed",
        error_code="source_not_found",
        duration_s=1.0,
        queue_latency_s=None,
        size=None,
        entries=None,
        extensions=0,
        properties={},
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    alarm = alarms()["FailedRequestsAlarm"]
    assert alarm["Namespace"] == directive["Namespace"]
    assert alarm["MetricName"] in {m["Name"] for m in directive["Metrics"]}
    dimensions = [d["Name"] for d in alarm["Dimensions"]]
    assert dimensions in directive["Dimensions"]
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {"Outcome": line["Outcome"]}
    assert (alarm["Statistic"], alarm["ComparisonOperator"]) == ("Sum", "GreaterThanThreshold")
    assert alarm["Threshold"] == {"Ref": "FailedRequestsThreshold"}
    assert alarm["TreatMissingData"] == "notBreaching"


def test_every_parameter_is_in_one_console_group() -> None:
    """The console shows every parameter, in exactly one group."""
    groups = template()["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = [name for group in groups for name in group["Parameters"]]
    assert sorted(grouped) == sorted(template()["Parameters"])


def test_outputs_name_the_queues_bucket_and_service() -> None:
    """The stack outputs queue URLs, DLQ ARN, bucket, service, and CloudFront's domain if enabled."""
    outputs = template()["Outputs"]
    assert {
        "SourceQueueUrl",
        "DestinationQueueUrl",
        "DeadLetterQueueArn",
        "ArchiveBucketName",
        "ServiceName",
    } <= set(outputs)
    assert outputs["CloudFrontDomainName"]["Condition"] == "UseCloudFront"


WORKER_MEMORY_PARAMETERS = {"PartSize", "MaxArchiveBytes", "UploadConcurrency", "PrefetchBytes", "MaxFiles"}


def worst_case_memory(**overrides: Any) -> float:
    """MiB the worker may peak at, by the memory formula (docs/settings.md, Memory), counting every
    optional term: interpreter, UploadConcurrency + 1 parts in flight and one more beside a copy, the
    read-ahead, the largest request (1 KiB a file, its 8 MiB body five times over), a buffered deflate
    entry, copied leads, obstore's runtime with the source GETs' threads."""
    p = {k: float(v) for k, v in Resolver(**overrides).params.items() if k in WORKER_MEMORY_PARAMETERS}
    mib = 1024 * 1024
    part = max(p["PartSize"], math.ceil(p["MaxArchiveBytes"] / 10_000 / mib) * mib)
    buffers = (p["UploadConcurrency"] + 2) * part + p["PrefetchBytes"] + 1024 * p["MaxFiles"]
    return 75 + buffers / mib + 5 * 8 + 16 + 10 + 10


def test_task_memory_help_counts_every_buffer() -> None:
    """The TaskMemory help names every setting the memory formula (docs/settings.md) adds up,
    PrefetchBytes included, and its estimate at the defaults is right and fits the smallest task
    Fargate offers."""
    description = template()["Parameters"]["TaskMemory"]["Description"]
    for name in WORKER_MEMORY_PARAMETERS:
        assert name in description, name
    estimate = worst_case_memory()
    assert f"~{round(estimate / 5) * 5} MiB at the defaults" in description
    assert estimate < min(int(m) for m in template()["Parameters"]["TaskMemory"]["AllowedValues"]) / 2


def test_every_task_cpu_has_a_memory_rule() -> None:
    """Each allowed TaskCpu has a Rule limiting TaskMemory to allowed values Fargate pairs with it."""
    parameters, rules = template()["Parameters"], template()["Rules"]
    memory = set(parameters["TaskMemory"]["AllowedValues"])
    covered = set()
    for rule in rules.values():
        if rule.get("RuleCondition", {}).get("Fn::Equals", [None])[0] != {"Ref": "TaskCpu"}:
            continue
        cpu = rule["RuleCondition"]["Fn::Equals"][1]
        covered.add(cpu)
        ((assertion,),) = [rule["Assertions"]]
        allowed, ref = assertion["Assert"]["Fn::Contains"]
        assert ref == {"Ref": "TaskMemory"} and set(allowed) <= memory
        assert all(int(cpu) * 2 <= int(m) <= int(cpu) * 8 for m in allowed), cpu
    assert covered == set(parameters["TaskCpu"]["AllowedValues"])
    assert (
        parameters["TaskMemory"]["Default"]
        in rules["Cpu1024Memory"]["Assertions"][0]["Assert"]["Fn::Contains"][0]
    )
