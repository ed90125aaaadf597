drop table customer_frames;
drop table subscriptions;
drop table profiles;
drop table business_categories;
drop table profession_types;
drop table plans;
