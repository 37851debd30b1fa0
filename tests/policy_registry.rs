//! Registry parsing, validation and lookups against the bundled snapshot.

use flowd::policy::registry::{
    normalize, scitag, split_scitag, LookupError, Registry, RegistryError,
};

#[test]
fn bundled_registry_is_valid_and_complete() {
    let r = Registry::bundled();
    assert_eq!(r.experiments.len(), 14);
    assert_eq!(
        r.modified.as_deref(),
        Some("2025-09-04T12:01:55.844133+00:00")
    );
    let ids: Vec<u16> = r.experiments.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=14).collect::<Vec<_>>());
}

#[test]
fn experiment_lookup_by_name_and_id() {
    let r = Registry::bundled();
    assert_eq!(r.experiment("atlas").unwrap().id, 2);
    assert_eq!(r.experiment("ATLAS").unwrap().id, 2);
    assert_eq!(r.experiment("Belle-II").unwrap().id, 6);
    assert_eq!(r.experiment_by_id(3).unwrap().name, "cms");
    assert!(r.experiment_by_id(15).is_none());
}

#[test]
fn activity_ids_are_scoped_to_their_experiment() {
    let r = Registry::bundled();
    assert_eq!(r.activity(2, "Production Input").unwrap().id, 15);
    assert_eq!(r.activity(3, "Production Input").unwrap().id, 12);
}

#[test]
fn activity_names_ignore_case_spaces_underscores_hyphens() {
    let r = Registry::bundled();
    assert_eq!(r.activity(2, "production_input").unwrap().id, 15);
    assert_eq!(r.activity(2, "PRODUCTION-INPUT").unwrap().id, 15);
    assert_eq!(r.activity(2, "productioninput").unwrap().id, 15);
    assert_eq!(r.activity(1, "perfsonar").unwrap().id, 2);
    // Punctuation other than space/_/- is kept.
    assert_eq!(r.activity(2, "upload/download (job)").unwrap().id, 22);
    assert!(r.activity(2, "uploaddownloadjob").is_err());
    assert_eq!(normalize("Data Rebalancing"), normalize("data_rebalancing"));
}

#[test]
fn same_normalised_name_in_different_experiments_is_not_ambiguous() {
    // The snapshot has "Data Rebalancing" (atlas 8, belleii 9) and "Data rebalancing"
    // (cms 7): lookups are scoped, so each experiment sees one.
    let r = Registry::bundled();
    assert_eq!(r.activity(2, "data rebalancing").unwrap().id, 8);
    assert_eq!(r.activity(3, "Data Rebalancing").unwrap().id, 7);
    assert_eq!(r.activity(6, "data-rebalancing").unwrap().id, 9);
}

fn colliding() -> Registry {
    let json = r#"{"version": 1, "modified": "x", "experiments": [{"expName": "atlas", "expId": 2,
        "activities": [{"activityName": "Data Challenge", "activityId": 4},
                       {"activityName": "DataChallenge", "activityId": 26}]}]}"#;
    Registry::from_json_bytes(json.as_bytes()).unwrap()
}

#[test]
fn normalisation_collision_is_ambiguous_unless_spelled_exactly() {
    let r = colliding();
    let e = r.activity(2, "data challenge").unwrap_err();
    assert_eq!(
        e,
        LookupError::Ambiguous {
            kind: "activity",
            scope: Some("atlas".into()),
            name: "data challenge".into(),
            candidates: vec!["Data Challenge".into(), "DataChallenge".into()],
        }
    );
    assert_eq!(
        e.to_string(),
        "activity \"data challenge\" is ambiguous in experiment \"atlas\": it matches \"Data Challenge\", \"DataChallenge\"; write the name exactly or use the numeric id"
    );
    assert_eq!(r.activity(2, "Data Challenge").unwrap().id, 4);
    assert_eq!(r.activity(2, "DataChallenge").unwrap().id, 26);
}

#[test]
fn unknown_names_list_close_matches() {
    let r = Registry::bundled();
    assert_eq!(
        r.experiment("atlsa").unwrap_err().to_string(),
        "unknown experiment \"atlsa\"; did you mean \"atlas\"?"
    );
    assert_eq!(
        r.activity(3, "Staginng").unwrap_err().to_string(),
        "unknown activity \"Staginng\" in experiment \"cms\"; did you mean \"Staging\"?"
    );
}

#[test]
fn scitag_integer_form() {
    assert_eq!(scitag(2, 4), 132);
    assert_eq!(split_scitag(132), Some((2, 4)));
    assert_eq!(split_scitag(313), Some((4, 57)));
    assert_eq!(split_scitag(63), None);
    assert_eq!(split_scitag(511 << 6 | 63), Some((511, 63)));
    assert_eq!(split_scitag(512 << 6), None);
}

#[test]
fn name_of_falls_back_to_numbers() {
    let r = Registry::bundled();
    assert_eq!(r.name_of(2, 15).to_string(), "atlas/Production Input");
    assert_eq!(r.name_of(2, 63).to_string(), "atlas/63");
    assert_eq!(r.name_of(300, 7).to_string(), "300/7");
}

#[test]
fn downloaded_documents_are_validated() {
    let bad = |json: &str| {
        Registry::from_json_bytes(json.as_bytes())
            .unwrap_err()
            .to_string()
    };
    let exp = |id: i64, acts: &str| {
        format!(
            r#"{{"version": 1, "experiments": [{{"expName": "x", "expId": {id}, "activities": [{acts}]}}]}}"#
        )
    };
    assert_eq!(
        bad(r#"{"version": 2, "experiments": []}"#),
        "registry version 2 is not supported (expected 1)"
    );
    assert_eq!(
        bad(r#"{"version": 1, "experiments": []}"#),
        "registry has no experiments"
    );
    assert_eq!(
        bad(&exp(0, "")),
        "experiment \"x\" has id 0, outside 1..=511"
    );
    assert_eq!(
        bad(&exp(512, "")),
        "experiment \"x\" has id 512, outside 1..=511"
    );
    assert_eq!(
        bad(&exp(5, r#"{"activityName": "a", "activityId": 64}"#)),
        "experiment \"x\": activity \"a\" has id 64, outside 0..=63"
    );
    assert_eq!(
        bad(&exp(
            5,
            r#"{"activityName": "a", "activityId": 1}, {"activityName": "b", "activityId": 1}"#
        )),
        "experiment \"x\": activity id 1 is used by both \"a\" and \"b\""
    );
    let dup = r#"{"version": 1, "experiments": [{"expName": "a", "expId": 1, "activities": []},
        {"expName": "b", "expId": 1, "activities": []}]}"#;
    assert_eq!(bad(dup), "experiment id 1 is used by both \"a\" and \"b\"");
    assert!(matches!(
        Registry::from_json_bytes(br#"{"version": 1, "experiments": [{"expName": 3}]}"#),
        Err(RegistryError::Shape(_))
    ));
    assert!(matches!(
        Registry::from_json_bytes(b"<html>"),
        Err(RegistryError::Shape(_))
    ));
}

#[test]
fn from_file_reads_a_local_replacement() {
    let dir = std::env::temp_dir().join(format!("flowd-registry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.json");
    std::fs::write(&path, include_str!("../src/policy/scitags-registry.json")).unwrap();
    assert_eq!(Registry::from_file(&path).unwrap(), Registry::bundled());
    std::fs::write(&path, "{}").unwrap();
    let e = Registry::from_file(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "registry file {}: registry is not valid JSON",
            path.display()
        )),
        "{e}"
    );
    assert!(Registry::from_file(&dir.join("missing.json")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
