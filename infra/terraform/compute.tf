# Instances: directory replicas (count) and shards with fixed instance
# numbers (for_each over var.shards). user_data installs roomshard into a
# virtualenv, writes the env files, and starts the systemd units from
# infra/systemd. Secrets come from SSM Parameter Store at boot, never from
# user_data itself.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "read_secrets" {
  statement {
    actions = ["ssm:GetParameter", "ssm:GetParameters"]
    resources = [
      "arn:aws:ssm:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:parameter${var.secrets_ssm_prefix}/*",
    ]
  }
}

resource "aws_iam_role" "instances" {
  name               = "${var.name}-instances"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "read_secrets" {
  name   = "read-roomshard-secrets"
  role   = aws_iam_role.instances.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

resource "aws_iam_instance_profile" "instances" {
  name = "${var.name}-instances"
  role = aws_iam_role.instances.name
}

locals {
  directory_internal_url = "http://${aws_lb.internal.dns_name}:${var.directory_port}"
  # What every shard machine is told, fixed-number or in the Auto Scaling group.
  shard_env = [
    "ROOMSHARD_HOST=0.0.0.0",
    "ROOMSHARD_PORT=${var.shard_port}",
    "ROOMSHARD_DIRECTORY_URL=${local.directory_internal_url}",
  ]
  units = {
    directory = file("${path.module}/../systemd/roomshard-directory.service")
    shard     = file("${path.module}/../systemd/roomshard-shard@.service")
    alb_rules = file("${path.module}/../systemd/roomshard-alb-rules.service")
  }
  # What every machine's user data (templates/user_data.sh.tftpl) shares; each adds its own.
  user_data_base = {
    instance       = ""
    advertise_port = ""
    rules_listener = ""
    directory_port = var.directory_port
    pip_spec       = var.roomshard_pip_spec
    ssm_prefix     = var.secrets_ssm_prefix
    region         = data.aws_region.current.name
    unit_files     = local.units
  }
  shard_user_data = merge(local.user_data_base, { role = "shard", secret_names = ["cluster_secret"] })
}

resource "aws_instance" "directory" {
  count                  = var.directory_count
  ami                    = var.ami_id
  instance_type          = var.directory_instance_type
  subnet_id              = var.private_subnet_ids[count.index % length(var.private_subnet_ids)]
  vpc_security_group_ids = [aws_security_group.instances.id]
  iam_instance_profile   = aws_iam_instance_profile.directory.name
  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", merge(local.user_data_base, {
    role = "directory"
    # The reconciler runs on the first directory machine only: one per load balancer.
    rules_listener = count.index == 0 ? aws_lb_listener.https.arn : ""
    env_lines = ["ROOMSHARD_HOST=0.0.0.0", "ROOMSHARD_PORT=${var.directory_port}", "ROOMSHARD_AUTH=jwt", "ROOMSHARD_PUBLIC_URL=${var.public_url}",
      # A new shard gets rooms only once its rule (the reconciler's) answers through the ALB.
    "ROOMSHARD_ROUTE_CHECK=on"]
    secret_names = ["database_url", "admin_token", "cluster_secret", "jwt_secret"]
  }))
  tags = { Name = "${var.name}-directory-${count.index + 1}", "roomshard:role" = "directory" }
}

resource "aws_instance" "shard" {
  for_each               = var.shards
  ami                    = var.ami_id
  instance_type          = var.shard_instance_type
  subnet_id              = each.value.subnet_id
  private_ip             = each.value.private_ip
  vpc_security_group_ids = [aws_security_group.instances.id]
  iam_instance_profile   = aws_iam_instance_profile.instances.name
  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", merge(local.shard_user_data, {
    instance = "i${each.key}"
    env_lines = concat(local.shard_env, [
      "ROOMSHARD_ADVERTISE_URL=http://${each.value.private_ip}:${var.shard_port}",
      # Long enough to hand every room over to the directory on SIGTERM;
      # the unit's TimeoutStopSec is longer still.
      "ROOMSHARD_SHUTDOWN_TIMEOUT=60",
      ],
      each.value.public_base == null ? [] : ["ROOMSHARD_PUBLIC_BASE=${each.value.public_base}"],
    each.value.capacity == null ? [] : ["ROOMSHARD_CAPACITY=${each.value.capacity}"])
  }))
  # Replacing a shard's machine must go through drain (docs/OPERATIONS.md).
  lifecycle {
    ignore_changes = [user_data, ami]
  }
  tags = { Name = "${var.name}-i${each.key}", "roomshard:instance" = "i${each.key}" }
}
