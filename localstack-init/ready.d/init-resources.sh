#!/usr/bin/env bash
# Creates the buckets and queues of the LocalStack dev loop: the same ones as `archiver demo`
# (archiver/demo.py:create_resources), so the defaults below must stay identical to that function.
#
# LocalStack runs it from /etc/localstack/init/ready.d once S3 and SQS are ready, with its own `awslocal`.
# Anywhere else it uses the plain AWS CLI against AWS_ENDPOINT_URL (LocalStack on localhost:4566, or
# moto and LocalStack in the tests), with LocalStack's dummy keys unless credentials or a profile are
# set, and refuses to run without an endpoint so it never creates anything in a real account.
# Running it again converges the same resources: existing buckets are kept, queue attributes re-applied.
#
# Names come from the worker's own settings when they are set (a queue may be given by name or URL),
# so with .envrc.dist loaded it creates exactly what the worker will use.
set -euo pipefail

source_bucket="${S3_SOURCE_BUCKET:-source-images}"
allowed_buckets="${ALLOWED_SOURCE_BUCKETS:-source-images,partner-images}"
destination_bucket="${S3_DESTINATION_BUCKET:-zip-storage}"
source_queue="${SQS_SOURCE_QUEUE:-input-queue}"
source_queue="${source_queue##*/}"
dead_letter_queue="${SQS_DEAD_LETTER_QUEUE:-${source_queue}-dlq}"
dead_letter_queue="${dead_letter_queue##*/}"
destination_queue="${SQS_DESTINATION_QUEUE:-output-queue}"
destination_queue="${destination_queue##*/}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"

# Queue attributes, as in demo.py.
visibility_timeout=120
max_receive_count=3
dead_letter_retention=1209600 # 14 days, the SQS maximum

if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
    # The plain CLI wherever an endpoint is given, even where some `awslocal` is installed: awscli-local
    # 0.23 prints a deprecation banner on every call. Passed explicitly: AWS CLI v1 ignores the variable.
    aws_cli=(aws --region "$region" --endpoint-url "$AWS_ENDPOINT_URL")
    if [[ -z "${AWS_ACCESS_KEY_ID:-}" && -z "${AWS_PROFILE:-}" ]]; then
        # LocalStack's dummy keys (access key "test" is its account 000000000000); moto takes any.
        export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
    fi
elif command -v awslocal >/dev/null 2>&1; then
    # Inside LocalStack's container: its own awslocal, which knows the endpoint and the keys.
    aws_cli=(awslocal --region "$region")
else
    echo "init-resources: neither AWS_ENDPOINT_URL nor awslocal; refusing to touch a real AWS account" >&2
    exit 2
fi

awscli() {
    "${aws_cli[@]}" "$@"
}

ensure_bucket() {
    local bucket="$1"
    if awscli s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
        echo "bucket $bucket exists"
        return
    fi
    if [[ "$region" == "us-east-1" ]]; then
        awscli s3api create-bucket --bucket "$bucket" >/dev/null
    else
        awscli s3api create-bucket --bucket "$bucket" \
            --create-bucket-configuration "LocationConstraint=$region" >/dev/null
    fi
    echo "bucket $bucket created"
}

# Prints the queue's URL. Created without attributes (idempotent even when they differ), then set.
ensure_queue() {
    local name="$1" attributes="$2" url
    url="$(awscli sqs create-queue --queue-name "$name" --query QueueUrl --output text)"
    if [[ -n "$attributes" ]]; then
        awscli sqs set-queue-attributes --queue-url "$url" --attributes "$attributes"
    fi
    echo "queue $name ready" >&2
    echo "$url"
}

buckets=("$source_bucket")
IFS=',' read -r -a listed <<<"$allowed_buckets"
for bucket in "${listed[@]}" "$destination_bucket"; do
    bucket="${bucket//[[:space:]]/}"
    [[ -z "$bucket" ]] && continue
    [[ " ${buckets[*]} " == *" $bucket "* ]] || buckets+=("$bucket")
done
for bucket in "${buckets[@]}"; do
    ensure_bucket "$bucket"
done

dlq_url="$(ensure_queue "$dead_letter_queue" "{\"MessageRetentionPeriod\":\"$dead_letter_retention\"}")"
dlq_arn="$(awscli sqs get-queue-attributes --queue-url "$dlq_url" --attribute-names QueueArn \
    --query Attributes.QueueArn --output text)"
redrive_policy="{\\\"deadLetterTargetArn\\\":\\\"$dlq_arn\\\",\\\"maxReceiveCount\\\":$max_receive_count}"
ensure_queue "$source_queue" \
    "{\"VisibilityTimeout\":\"$visibility_timeout\",\"RedrivePolicy\":\"$redrive_policy\"}" >/dev/null
ensure_queue "$destination_queue" "" >/dev/null

echo "init-resources: buckets ${buckets[*]}; queues $source_queue (DLQ $dead_letter_queue), $destination_queue"
