#!/usr/bin/env bash
# One-time GCP setup for deploy/gcp/cluster-gcp.yaml: a network that admits SSH from your own
# address range only, and least-privilege service accounts.
#
#   deploy/gcp/setup.sh --project PROJECT --bucket YOUR-BUCKET --cidr 198.51.100.7/32
#                       [--region us-central1] [--dry-run]
#
# Creates (names fixed, so cluster-gcp.yaml can refer to them):
#   network cxr-ray-net, subnet cxr-ray-subnet (10.42.0.0/20)
#   firewall cxr-ray-ssh       tcp:22 from --cidr to instances tagged cxr-ray (nothing else from outside;
#                              the "default" network's open SSH/RDP rules do not apply here)
#   firewall cxr-ray-internal  all traffic between instances tagged cxr-ray
#   service account cxr-ray-head    custom role cxrRayLauncher (create/delete/list instances and
#                                   what a launch needs), may attach cxr-ray-worker and no other account,
#                                   objectAdmin on gs://BUCKET only
#   service account cxr-ray-worker  objectAdmin on gs://BUCKET only
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
project="" bucket="" cidr="" region="us-central1" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --project) project="$2"; shift 2 ;;
        --bucket) bucket="$2"; shift 2 ;;
        --cidr) cidr="$2"; shift 2 ;;
        --region) region="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
[ -n "$project" ] && [ -n "$bucket" ] && [ -n "$cidr" ] \
    || { echo "usage: $0 --project PROJECT --bucket BUCKET --cidr YOUR-CIDR [--dry-run]" >&2; exit 2; }
case "$cidr" in
    0.0.0.0/0|::/0) echo "refusing --cidr $cidr: SSH would be open to the whole internet" >&2; exit 2 ;;
    */*) ;;
    *) echo "--cidr needs a prefix length, e.g. 198.51.100.7/32" >&2; exit 2 ;;
esac
gcloud_() { if [ "$dry" = 1 ]; then echo "gcloud $*"; else gcloud --project "$project" "$@"; fi; }

gcloud_ compute networks create cxr-ray-net --subnet-mode=custom
gcloud_ compute networks subnets create cxr-ray-subnet --network=cxr-ray-net --region="$region" --range=10.42.0.0/20
gcloud_ compute firewall-rules create cxr-ray-ssh --network=cxr-ray-net --direction=INGRESS \
    --allow=tcp:22 --source-ranges="$cidr" --target-tags=cxr-ray
gcloud_ compute firewall-rules create cxr-ray-internal --network=cxr-ray-net --direction=INGRESS \
    --allow=tcp,udp,icmp --source-tags=cxr-ray --target-tags=cxr-ray

head="cxr-ray-head@$project.iam.gserviceaccount.com"
worker="cxr-ray-worker@$project.iam.gserviceaccount.com"
gcloud_ iam service-accounts create cxr-ray-head --display-name="cxr-ray head (launches workers)"
gcloud_ iam service-accounts create cxr-ray-worker --display-name="cxr-ray workers (study bucket only)"
gcloud_ iam roles create cxrRayLauncher --project="$project" --title="cxr-ray launcher" \
    --permissions=compute.instances.create,compute.instances.delete,compute.instances.get,compute.instances.list,compute.instances.setLabels,compute.instances.setMetadata,compute.instances.setServiceAccount,compute.instances.setTags,compute.instances.start,compute.instances.stop,compute.disks.create,compute.disks.setLabels,compute.subnetworks.use,compute.subnetworks.useExternalIp,compute.zoneOperations.get,compute.images.useReadOnly
gcloud_ projects add-iam-policy-binding "$project" --member="serviceAccount:$head" \
    --role="projects/$project/roles/cxrRayLauncher"
gcloud_ iam service-accounts add-iam-policy-binding "$worker" --member="serviceAccount:$head" \
    --role=roles/iam.serviceAccountUser
for account in "$head" "$worker"; do
    gcloud_ storage buckets add-iam-policy-binding "gs://$bucket" --member="serviceAccount:$account" \
        --role=roles/storage.objectAdmin
done
cat <<DONE
In deploy/gcp/cluster-gcp.yaml replace your-gcp-project-id with $project (and us-central1 if you
chose another region); use --storage gs://$bucket/cxr-ray for studies.
Ray's GCP launcher also creates ray-autoscaler-sa-v1 with project-wide roles on every 'ray up'
(no node of this config uses it); see docs/cluster.md for removing those bindings.
DONE
