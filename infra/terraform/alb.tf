# The public ALB: HTTPS only (HTTP redirects), a fixed 404 for anything no
# rule claims. Priorities 1..999 are this module's (the directory);
# 1000 + N belongs to shard iN and is written by `roomshard rules`
# (see docs/OPERATIONS.md), which takes this listener's ARN as input.

resource "aws_lb" "public" {
  name               = "${var.name}-public"
  load_balancer_type = "application"
  internal           = false
  subnets            = var.public_subnet_ids
  security_groups    = [aws_security_group.alb.id]
  # A WebSocket that is quiet between pings must outlive the idle timeout:
  # shards ping every 20 s by default, so 60 s leaves room for two misses.
  idle_timeout               = var.idle_timeout
  drop_invalid_header_fields = true
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.public.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      status_code  = "404"
      message_body = "{\"error\": {\"code\": \"not_found\", \"message\": \"no such route\"}}"
    }
  }
}

resource "aws_lb_listener" "http_redirect" {
  load_balancer_arn = aws_lb.public.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

resource "aws_lb_target_group" "directory" {
  name                 = "${var.name}-directory"
  port                 = var.directory_port
  protocol             = "HTTP"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  deregistration_delay = 10
  health_check {
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

# The control plane is never public: /v1/internal/* answers 404 at the edge.
resource "aws_lb_listener_rule" "internal_blocked" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 5
  action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      status_code  = "404"
      message_body = "{\"error\": {\"code\": \"not_found\", \"message\": \"no such route\"}}"
    }
  }
  condition {
    path_pattern {
      values = ["/v1/internal/*"]
    }
  }
}

# The directory: the API, the chat page and its assets, the OpenAPI document.
resource "aws_lb_listener_rule" "directory" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 10
  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.directory.arn
  }
  condition {
    path_pattern {
      values = ["/v1/*", "/", "/openapi.json", "/static/*", "/healthz"]
    }
  }
}

resource "aws_lb_target_group_attachment" "directory" {
  count            = var.directory_count
  target_group_arn = aws_lb_target_group.directory.arn
  target_id        = aws_instance.directory[count.index].id
  port             = var.directory_port
}

# Shards reach the directory replicas through an internal ALB.
resource "aws_lb" "internal" {
  name               = "${var.name}-internal"
  load_balancer_type = "application"
  internal           = true
  subnets            = var.private_subnet_ids
  security_groups    = [aws_security_group.internal_alb.id]
}

resource "aws_lb_target_group" "directory_internal" {
  name                 = "${var.name}-directory-int"
  port                 = var.directory_port
  protocol             = "HTTP"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  deregistration_delay = 10
  health_check {
    path    = "/readyz"
    matcher = "200"
  }
}

resource "aws_lb_listener" "internal" {
  load_balancer_arn = aws_lb.internal.arn
  port              = var.directory_port
  protocol          = "HTTP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.directory_internal.arn
  }
}

resource "aws_lb_target_group_attachment" "directory_internal" {
  count            = var.directory_count
  target_group_arn = aws_lb_target_group.directory_internal.arn
  target_id        = aws_instance.directory[count.index].id
  port             = var.directory_port
}

# Further ALB groups: one ALB per extra public host, shards only (past the
# 100-target-group limit of one ALB). `roomshard rules` fills their rules.
resource "aws_lb" "extra" {
  for_each                   = toset(var.extra_public_hosts)
  name                       = trim(substr("${var.name}-${replace(each.value, ".", "-")}", 0, 32), "-")
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  idle_timeout               = var.idle_timeout
  drop_invalid_header_fields = true
}

resource "aws_lb_listener" "extra_https" {
  for_each          = aws_lb.extra
  load_balancer_arn = each.value.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn
  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      status_code  = "404"
      message_body = "{\"error\": {\"code\": \"not_found\", \"message\": \"no such route\"}}"
    }
  }
}
