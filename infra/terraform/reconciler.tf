# The load balancer reconciler: `roomshard rules apply --watch` on the first
# directory machine (roomshard-alb-rules.service) keeps the public ALB's
# shard rules and target groups equal to the directory's registry. These are
# the permissions it needs, on the directory machines' role only (the shards
# never change the load balancer).

data "aws_iam_policy_document" "reconciler" {
  statement {
    sid = "ReadTheLoadBalancer"
    actions = [
      "elasticloadbalancing:DescribeListeners",
      "elasticloadbalancing:DescribeRules",
      "elasticloadbalancing:DescribeTargetGroups",
      "elasticloadbalancing:DescribeTargetGroupAttributes",
      "elasticloadbalancing:DescribeTargetHealth",
      "elasticloadbalancing:DescribeTags",
    ]
    resources = ["*"] # Describe calls: AWS allows no narrower resource
  }
  statement {
    sid = "ShardRules"
    actions = [
      "elasticloadbalancing:CreateRule",
      "elasticloadbalancing:ModifyRule",
      "elasticloadbalancing:DeleteRule",
      "elasticloadbalancing:AddTags",
    ]
    resources = [
      aws_lb_listener.https.arn,
      replace("${aws_lb_listener.https.arn}/*", ":listener/", ":listener-rule/"),
    ]
  }
  statement {
    sid = "ShardTargetGroups"
    actions = [
      "elasticloadbalancing:CreateTargetGroup",
      "elasticloadbalancing:ModifyTargetGroup",
      "elasticloadbalancing:ModifyTargetGroupAttributes",
      "elasticloadbalancing:DeleteTargetGroup",
      "elasticloadbalancing:RegisterTargets",
      "elasticloadbalancing:DeregisterTargets",
      "elasticloadbalancing:AddTags",
    ]
    resources = ["arn:aws:elasticloadbalancing:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:targetgroup/${var.rules_name_prefix}-i*/*"]
  }
}

resource "aws_iam_role" "directory" {
  name               = "${var.name}-directory"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "directory_secrets" {
  name   = "read-roomshard-secrets"
  role   = aws_iam_role.directory.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

resource "aws_iam_role_policy" "reconciler" {
  name   = "roomshard-rules-reconciler"
  role   = aws_iam_role.directory.id
  policy = data.aws_iam_policy_document.reconciler.json
}

resource "aws_iam_instance_profile" "directory" {
  name = "${var.name}-directory"
  role = aws_iam_role.directory.name
}
