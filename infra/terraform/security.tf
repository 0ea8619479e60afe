# Three security groups: the public ALB (443/80 from the internet), the
# internal ALB (the directory's control plane, from the instances), and the
# instances (from both ALBs and from each other: directory <-> shard calls).

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "roomshard public ALB"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each          = toset(var.ingress_cidrs)
  security_group_id = aws_security_group.alb.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "alb_http" {
  for_each          = toset(var.ingress_cidrs)
  security_group_id = aws_security_group.alb.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
}

resource "aws_vpc_security_group_egress_rule" "alb_to_instances" {
  security_group_id            = aws_security_group.alb.id
  referenced_security_group_id = aws_security_group.instances.id
  ip_protocol                  = "tcp"
  from_port                    = min(var.directory_port, var.shard_port)
  to_port                      = max(var.directory_port, var.shard_port)
}

resource "aws_security_group" "internal_alb" {
  name        = "${var.name}-internal-alb"
  description = "roomshard internal ALB (directory control plane)"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "internal_alb_from_instances" {
  security_group_id            = aws_security_group.internal_alb.id
  referenced_security_group_id = aws_security_group.instances.id
  ip_protocol                  = "tcp"
  from_port                    = var.directory_port
  to_port                      = var.directory_port
}

resource "aws_vpc_security_group_egress_rule" "internal_alb_to_instances" {
  security_group_id            = aws_security_group.internal_alb.id
  referenced_security_group_id = aws_security_group.instances.id
  ip_protocol                  = "tcp"
  from_port                    = var.directory_port
  to_port                      = var.directory_port
}

resource "aws_security_group" "instances" {
  name        = "${var.name}-instances"
  description = "roomshard directory and shard instances"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "instances_from_alb" {
  security_group_id            = aws_security_group.instances.id
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = min(var.directory_port, var.shard_port)
  to_port                      = max(var.directory_port, var.shard_port)
}

resource "aws_vpc_security_group_ingress_rule" "instances_from_internal_alb" {
  security_group_id            = aws_security_group.instances.id
  referenced_security_group_id = aws_security_group.internal_alb.id
  ip_protocol                  = "tcp"
  from_port                    = var.directory_port
  to_port                      = var.directory_port
}

# The directory calls shards (handoff, access, load) on their internal URL.
resource "aws_vpc_security_group_ingress_rule" "instances_from_instances" {
  security_group_id            = aws_security_group.instances.id
  referenced_security_group_id = aws_security_group.instances.id
  ip_protocol                  = "tcp"
  from_port                    = min(var.directory_port, var.shard_port)
  to_port                      = max(var.directory_port, var.shard_port)
}

resource "aws_vpc_security_group_egress_rule" "instances_out" {
  security_group_id = aws_security_group.instances.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}
