#!/usr/bin/env bash
# One-time AWS setup for cluster.yaml: least-privilege instance profiles and a security group
# that admits SSH from your own address range only.
#
#   deploy/aws/setup.sh --bucket YOUR-BUCKET --cidr 198.51.100.7/32 [--prefix cxr-ray]
#                       [--region us-west-2] [--vpc vpc-...] [--dry-run]
#
# Creates (names fixed, so cluster.yaml can refer to them):
#   role + instance profile cxr-ray-head    deploy/aws/iam-head-policy.json: launch and terminate
#                                           instances tagged ray-cluster-name=cxr-ray, pass the worker
#                                           role, read/write s3://BUCKET/PREFIX only
#   role + instance profile cxr-ray-worker  deploy/aws/iam-worker-policy.json: s3://BUCKET/PREFIX only
#   security group cxr-ray                  TCP 22 from --cidr, all traffic between its own members
# and prints the ACCOUNT_ID and security-group id to put into cluster.yaml. --dry-run prints the
# aws commands instead of running them. Needs the aws CLI and IAM/EC2 rights for this setup
# (an administrator runs it once; the cluster itself never gets those rights).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bucket="" cidr="" prefix="cxr-ray" region="us-west-2" vpc="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bucket) bucket="$2"; shift 2 ;;
        --cidr) cidr="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --region) region="$2"; shift 2 ;;
        --vpc) vpc="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
[ -n "$bucket" ] && [ -n "$cidr" ] || { echo "usage: $0 --bucket BUCKET --cidr YOUR-CIDR [--dry-run]" >&2; exit 2; }
case "$cidr" in
    0.0.0.0/0|::/0) echo "refusing --cidr $cidr: SSH would be open to the whole internet" >&2; exit 2 ;;
    */*) ;;
    *) echo "--cidr needs a prefix length, e.g. 198.51.100.7/32" >&2; exit 2 ;;
esac

aws_() {  # run, or print in --dry-run; output (ids) on stdout
    if [ "$dry" = 1 ]; then echo "aws $*" >&2; echo "DRY-RUN"; else aws --region "$region" "$@"; fi
}

account=$(aws_ sts get-caller-identity --query Account --output text)
[ "$dry" = 1 ] && account=ACCOUNT_ID
render() {  # a policy file with this account, bucket and prefix filled in
    sed -e "s/ACCOUNT_ID/$account/g" -e "s/YOUR-BUCKET/$bucket/g" -e "s#cxr-ray/\\*#$prefix/*#g" \
        -e "s#\"cxr-ray\", \"cxr-ray/\\*\"#\"$prefix\", \"$prefix/*\"#g" "$here/$1"
}
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
for who in head worker; do
    aws_ iam create-role --role-name "cxr-ray-$who" --assume-role-policy-document "$trust" >/dev/null
    aws_ iam put-role-policy --role-name "cxr-ray-$who" --policy-name "cxr-ray-$who" \
        --policy-document "$(render "iam-$who-policy.json")" >/dev/null
    aws_ iam create-instance-profile --instance-profile-name "cxr-ray-$who" >/dev/null
    aws_ iam add-role-to-instance-profile --instance-profile-name "cxr-ray-$who" --role-name "cxr-ray-$who" >/dev/null
done

if [ -z "$vpc" ]; then
    vpc=$(aws_ ec2 describe-vpcs --filters Name=isDefault,Values=true --query 'Vpcs[0].VpcId' --output text)
fi
sg=$(aws_ ec2 create-security-group --group-name cxr-ray --vpc-id "$vpc" \
    --description "cxr-ray: SSH from $cidr, traffic between members" --query GroupId --output text)
aws_ ec2 authorize-security-group-ingress --group-id "$sg" --ip-permissions \
    "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr,Description=ray-up-ssh}]" >/dev/null
aws_ ec2 authorize-security-group-ingress --group-id "$sg" --ip-permissions \
    "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]" >/dev/null

cat <<DONE
In cluster.yaml replace
  ACCOUNT_ID     -> $account
  sg-REPLACE-ME  -> $sg
and use --storage s3://$bucket/$prefix for studies.
DONE
