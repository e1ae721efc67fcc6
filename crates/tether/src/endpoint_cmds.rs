//! `tether endpoints`: each endpoint with its readiness and stamp age, and the pools with
//! what each hands out now (SPEC §5).

use clap::Args;

use crate::client_cmds::{print_json, ClientArgs};
use crate::ui::{self, Cell, Colour, Table};
use crate::CliError;

#[derive(Debug, Clone, Args)]
pub struct EndpointsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the JSON of `GET /v1/endpoints` instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn endpoints(args: EndpointsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let list = client.list_endpoints().await?;
    if args.json {
        print_json(&list);
        return Ok(0);
    }
    if list.endpoints.is_empty() {
        println!("no endpoints registered (PUT /v1/endpoints/{{name}} registers one)");
    } else {
        let mut table = Table::new(&[
            "NAME",
            "POOL",
            "KIND",
            "READY",
            ">STAMP AGE",
            "URL",
            "LAST ERROR",
        ]);
        for e in &list.endpoints {
            table.row(vec![
                Cell::new(e.name.clone()),
                Cell::new(e.pool.clone()),
                Cell::new(e.kind.as_str()),
                if e.ready {
                    Cell::coloured("yes", Colour::Green)
                } else {
                    Cell::coloured("no", Colour::Red)
                },
                Cell::new(e.stamp_age_s.map(ui::span).unwrap_or_else(|| "-".into())),
                Cell::new(e.url.clone()),
                Cell::new(e.last_error.clone().unwrap_or_default()),
            ]);
        }
        table.print();
    }
    // Pools are shown even with no endpoint: a pool's fallback is what runs get then.
    let pools = client.list_pools().await?;
    println!();
    if pools.pools.is_empty() {
        println!("no pools (a run's --endpoint VAR=POOL names one; [pools.NAME] in --config or PUT /v1/pools/{{pool}} sets its fallback)");
        return Ok(0);
    }
    let mut table = Table::new(&["POOL", ">FRESHNESS", "SOURCE", "DISPATCHES NOW", "FALLBACK"]);
    for p in &pools.pools {
        let now = match client.dispatch(&p.name).await {
            Ok(d) => format!(
                "{} ({})",
                d.url.unwrap_or_default(),
                d.endpoint.unwrap_or_else(|| d.source.as_str().into())
            ),
            Err(_) => "nothing ready, no fallback".into(),
        };
        table.row(vec![
            Cell::new(p.name.clone()),
            Cell::new(format!("{} s", p.freshness_s)),
            Cell::new(p.source.clone()),
            Cell::new(now),
            Cell::new(p.fallback_url.clone().unwrap_or_else(|| "-".into())),
        ]);
    }
    table.print();
    Ok(0)
}
