# Elastic shards: an Auto Scaling group of identical machines that the
# directory numbers at start-up (`roomshard shard --instance auto`), with a
# termination lifecycle hook. When the group scales in, the machine waits in
# Terminating:Wait while its shard hands every room over live and leaves the
# registry; then the shard completes the hook (ROOMSHARD_ASG_LIFECYCLE_HOOK)
# and the group terminates the machine. The load balancer rules for these
# shards are the reconciler's (reconciler.tf), never Terraform's: a new
# machine's rule appears within a second of its first heartbeat, and it gets
# rooms once the directory sees its route answer (ROOMSHARD_ROUTE_CHECK).
# Scale the group by any policy you like (CPU, connections from the shards'
# /metrics); nothing else has to be run by hand.

locals {
  shard_group_enabled = var.shard_group != null
  # Longer than a shard's whole stop (drain, clients closed, leave): the hook must
  # not run out while rooms are still moving.
  shard_group_hook_timeout = 3 * var.shard_group_shutdown_timeout
}

data "aws_iam_policy_document" "shard_group" {
  statement {
    sid       = "CompleteOwnLifecycleHook"
    actions   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
    resources = ["arn:aws:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${var.name}-shards"]
  }
  statement {
    sid       = "FindOwnGroup"
    actions   = ["autoscaling:DescribeAutoScalingInstances"]
    resources = ["*"] # a Describe call: AWS allows no narrower resource
  }
}

resource "aws_iam_role" "shard_group" {
  count              = local.shard_group_enabled ? 1 : 0
  name               = "${var.name}-shard-group"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "shard_group_lifecycle" {
  count  = local.shard_group_enabled ? 1 : 0
  name   = "complete-lifecycle-hook"
  role   = aws_iam_role.shard_group[0].id
  policy = data.aws_iam_policy_document.shard_group.json
}

resource "aws_iam_role_policy" "shard_group_secrets" {
  count  = local.shard_group_enabled ? 1 : 0
  name   = "read-roomshard-secrets"
  role   = aws_iam_role.shard_group[0].id
  policy = data.aws_iam_policy_document.read_secrets.json
}

resource "aws_iam_instance_profile" "shard_group" {
  count = local.shard_group_enabled ? 1 : 0
  name  = "${var.name}-shard-group"
  role  = aws_iam_role.shard_group[0].name
}

resource "aws_launch_template" "shard" {
  count                  = local.shard_group_enabled ? 1 : 0
  name_prefix            = "${var.name}-shard-"
  image_id               = var.ami_id
  instance_type          = var.shard_instance_type
  vpc_security_group_ids = [aws_security_group.instances.id]
  iam_instance_profile {
    name = aws_iam_instance_profile.shard_group[0].name
  }
  metadata_options {
    http_tokens   = "required" # IMDSv2: the shard reads its lifecycle state through it
    http_endpoint = "enabled"
  }
  user_data = base64encode(templatefile("${path.module}/templates/user_data.sh.tftpl", merge(local.shard_user_data, {
    instance       = "auto"
    advertise_port = var.shard_port
    env_lines = concat(local.shard_env, [
      "ROOMSHARD_SHUTDOWN_TIMEOUT=${var.shard_group_shutdown_timeout}",
      "ROOMSHARD_ASG_LIFECYCLE_HOOK=${var.name}-shard-drain",
    ])
  })))
  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "${var.name}-shard", "roomshard:role" = "shard" }
  }
}

resource "aws_autoscaling_group" "shards" {
  count               = local.shard_group_enabled ? 1 : 0
  name                = "${var.name}-shards"
  min_size            = var.shard_group.min_size
  max_size            = var.shard_group.max_size
  desired_capacity    = var.shard_group.desired_capacity
  vpc_zone_identifier = var.private_subnet_ids
  health_check_type   = "EC2"
  launch_template {
    id      = aws_launch_template.shard[0].id
    version = "$Latest"
  }
  # The hook exists before the first machine does, so no machine ever goes without it.
  initial_lifecycle_hook {
    name                 = "${var.name}-shard-drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = local.shard_group_hook_timeout
    default_result       = "CONTINUE"
  }
  tag {
    key                 = "roomshard:role"
    value               = "shard"
    propagate_at_launch = true
  }
}
