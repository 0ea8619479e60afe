# Inputs of the generated rules (`roomshard rules --format terraform`):
# vpc_id and listener_arn (default group), listener_arn_<host> (extra groups).

output "vpc_id" {
  value = var.vpc_id
}

output "listener_arn" {
  description = "HTTPS listener of the default ALB group (ROOMSHARD_PUBLIC_URL)."
  value       = aws_lb_listener.https.arn
}

output "extra_listener_arns" {
  description = "Public host -> HTTPS listener of its ALB group."
  value       = { for host, l in aws_lb_listener.extra_https : host => l.arn }
}

output "public_dns_name" {
  description = "Point the host of ROOMSHARD_PUBLIC_URL here (CNAME or alias)."
  value       = aws_lb.public.dns_name
}

output "extra_dns_names" {
  description = "Public host -> the DNS name of its ALB."
  value       = { for host, lb in aws_lb.extra : host => lb.dns_name }
}

output "directory_internal_url" {
  description = "Where shards (and operators inside the VPC) reach the directory."
  value       = local.directory_internal_url
}

output "shard_targets" {
  description = "Instance id -> private IP (the ip targets of the generated rules)."
  value       = { for n, s in var.shards : "i${n}" => s.private_ip }
}
