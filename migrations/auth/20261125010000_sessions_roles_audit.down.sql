drop table audit_events;
drop table user_roles;
drop table role_permissions;
drop table permissions;
drop table roles;
drop table refresh_tokens;
drop table sessions;
alter table users drop column display_name;
