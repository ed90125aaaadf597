drop table notifications;
drop table notification_sequences;
drop table generation_quota;
drop table generation_jobs;
