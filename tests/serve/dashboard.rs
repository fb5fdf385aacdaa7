//! The dashboard in a real headless Chromium, driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`; `.ci/run` installs them): it lists a job, shows
//! its stages turning green and a loss curve with points, and its cancel button
//! cancels. The screenshot of the finished quickstart smoke job is `docs/dashboard.png`
//! (`TRAINYARD_UPDATE_SCREENSHOT=1` writes it there; otherwise under the target dir).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::api::Server;
use crate::common::Sandbox;

/// `chromedriver` on a free port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let binary =
            std::env::var("TRAINYARD_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        use std::os::unix::process::CommandExt;
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            // Its own process group, which Chromium joins: a failed test kills both.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "{binary}: {error}. The dashboard test drives a real headless Chromium: \
                     install Debian's `chromium` and `chromium-driver` (as .ci/run does), or \
                     point TRAINYARD_CHROMEDRIVER at a chromedriver"
                )
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group this test started.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    let binary = std::env::var("TRAINYARD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    capabilities.insert(
        "goog:chromeOptions".to_string(),
        serde_json::json!({
            "binary": binary,
            // Root in CI: Chromium's sandbox needs a user namespace it cannot have there.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1600,1000", "--hide-scrollbars"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Polls `check` (every 100 ms) until it gives a value, or fails after `seconds`.
async fn wait_for<T, F, Fut>(what: &str, seconds: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `data-status` of every stage box shown.
async fn stage_statuses(client: &Client) -> Vec<(String, String)> {
    let mut statuses = Vec::new();
    for element in client
        .find_all(Locator::Css(".stage"))
        .await
        .unwrap_or_default()
    {
        let name = element
            .attr("data-stage")
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let status = element
            .attr("data-status")
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        statuses.push((name, status));
    }
    statuses
}

async fn attribute(client: &Client, css: &str, name: &str) -> Option<String> {
    client
        .find(Locator::Css(css))
        .await
        .ok()?
        .attr(name)
        .await
        .ok()
        .flatten()
}

fn copy_quickstart(sandbox: &Sandbox) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (from, to) in [
        ("pipelines/quickstart.yaml", "quickstart.yaml"),
        ("profiles/smoke.yaml", "profiles/smoke.yaml"),
    ] {
        sandbox.write(to, &std::fs::read_to_string(root.join(from)).unwrap());
    }
}

const LONG: &str = r#"{"pipeline": "quickstart.yaml", "profiles": ["smoke"], "set": ["stages.pretrain.with.steps=100000"]}"#;
const SMOKE: &str = r#"{"pipeline": "quickstart.yaml", "profiles": ["smoke"]}"#;

/// Clicks job `id` in the list once it is there (the list refreshes every 2 s).
async fn open_job(client: &Client, id: i64) {
    wait_for("the job in the list", 30, || async {
        client
            .find(Locator::Css(&format!(".job[data-job=\"{id}\"]")))
            .await
            .ok()
    })
    .await
    .click()
    .await
    .unwrap();
}

#[test]
fn the_dashboard_shows_a_job_going_green_with_its_loss_curve_and_cancels_another() {
    let sandbox = Sandbox::new();
    copy_quickstart(&sandbox);
    let server = Server::start(&sandbox);
    let driver = Driver::start();
    let id = |created: serde_json::Value| created["id"].as_i64().unwrap();
    // A long job keeps the (single) worker busy, so the smoke job waits in the queue
    // until the browser watches it.
    let blocker = id(server.post("/api/jobs", LONG).1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let screenshot = runtime.block_on(async {
        let client = browser(&driver).await;
        client
            .goto(&format!("{}/#token={}", server.base, server.token))
            .await
            .unwrap();
        open_job(&client, blocker).await;
        let smoke = id(server.post("/api/jobs", SMOKE).1);
        open_job(&client, smoke).await;
        wait_for("the smoke job shown queued", 30, || async {
            let shown = attribute(&client, "#job-state", "data-job").await?;
            let state = attribute(&client, "#job-state", "class").await?;
            (shown == smoke.to_string() && state.contains("queued")).then_some(())
        })
        .await;
        assert_eq!(
            server.post(&format!("/api/jobs/{blocker}/cancel"), "").0,
            200
        );

        // Stages turn green one after another as the run goes.
        let mut seen_partly_green = false;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let statuses = stage_statuses(&client).await;
            let is_green = |status: &str| status == "executed" || status == "cached";
            let green = statuses
                .iter()
                .filter(|(_, status)| is_green(status))
                .count();
            if green > 0 && green < statuses.len() {
                seen_partly_green = true;
            }
            let state = attribute(&client, "#job-state", "class")
                .await
                .unwrap_or_default();
            if green > 0 && green == statuses.len() && state.contains("succeeded") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for every stage green: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            seen_partly_green,
            "the stages were never seen turning green one after another"
        );
        let statuses = stage_statuses(&client).await;
        let names: Vec<&str> = statuses.iter().map(|(name, _)| name.as_str()).collect();
        for stage in ["docs", "tokenizer", "pretrain", "sft", "export", "evaluate"] {
            assert!(
                names.contains(&stage),
                "stage {stage} missing from {names:?}"
            );
        }
        // The loss curve has the training steps and the evaluations as points.
        let (points, evals) = wait_for("the loss curve", 30, || async {
            let points: usize = attribute(&client, "#chart", "data-points")
                .await?
                .parse()
                .ok()?;
            let evals: usize = attribute(&client, "#chart", "data-evals")
                .await?
                .parse()
                .ok()?;
            (points > 0 && evals > 0).then_some((points, evals))
        })
        .await;
        assert!(points >= 30, "{points} training steps drawn");
        assert!(evals >= 1, "{evals} evaluations drawn");
        let links = wait_for("artifact links", 30, || async {
            let links = client.find_all(Locator::Css("a[download]")).await.ok()?;
            (links.len() > 5).then_some(links)
        })
        .await;
        assert!(links.len() > 5);
        // The list has caught up (it refreshes every 2 s) before the picture is taken.
        wait_for("the list showing the job succeeded", 30, || async {
            let state = attribute(
                &client,
                &format!(".job[data-job=\"{smoke}\"]"),
                "data-state",
            )
            .await?;
            (state == "succeeded").then_some(())
        })
        .await;
        let screenshot = client.screenshot().await.unwrap();

        // The cancel button cancels a running job.
        let long = id(server.post("/api/jobs", LONG).1);
        open_job(&client, long).await;
        wait_for("the pretrain stage running", 120, || async {
            let statuses = stage_statuses(&client).await;
            statuses
                .iter()
                .any(|(name, status)| name == "pretrain" && status == "running")
                .then_some(())
        })
        .await;
        let button = wait_for("an enabled cancel button", 30, || async {
            let button = client.find(Locator::Css("#cancel")).await.ok()?;
            (button.attr("disabled").await.ok()?.is_none()).then_some(button)
        })
        .await;
        button.click().await.unwrap();
        wait_for("the job shown cancelled", 120, || async {
            let shown = attribute(&client, "#job-state", "data-job").await?;
            let state = attribute(&client, "#job-state", "class").await?;
            (shown == long.to_string() && state.contains("cancelled")).then_some(())
        })
        .await;
        client.close().await.unwrap();
        assert_eq!(
            server.wait_for_state(long, "cancelled")["job"]["state"],
            "cancelled"
        );
        screenshot
    });

    assert!(screenshot.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        screenshot.len() > 20_000,
        "{} bytes: a blank page?",
        screenshot.len()
    );
    let target = match std::env::var_os("TRAINYARD_UPDATE_SCREENSHOT") {
        Some(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png"),
        None => std::env::temp_dir().join("trainyard-dashboard.png"),
    };
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, &screenshot).unwrap();
}
