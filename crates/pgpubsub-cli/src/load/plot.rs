//! `--plot FILE.svg`: latency over the run, and its distribution.

use plotters::prelude::*;

use super::report::Report;

/// Draws two panels: latency (ms) over time (s), and a latency histogram.
pub fn draw(path: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    let samples = &report.samples;
    if samples.is_empty() {
        anyhow::bail!("no latency samples to draw");
    }
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(640);
    let xmax = samples.iter().map(|s| s.0).max().unwrap_or(1) as f64 / 1e6;
    let lat: Vec<f64> = samples.iter().map(|s| s.1 as f64 / 1000.0).collect();
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    // Scale to the 99.9th percentile so one outlier does not flatten the rest.
    let ymax = sorted[((sorted.len() - 1) as f64 * 0.999) as usize].max(0.01) * 1.1;
    let title = format!("{}: latency over time (ms)", report.scenario);
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax.max(0.001), 0f64..ymax)?;
    chart.configure_mesh().x_desc("seconds since first event").y_desc("ms").draw()?;
    chart.draw_series(
        samples
            .iter()
            .map(|&(t, l)| Circle::new((t as f64 / 1e6, (l as f64 / 1000.0).min(ymax)), 1, BLUE.mix(0.4).filled())),
    )?;

    let buckets = 40usize;
    let width = ymax / buckets as f64;
    let mut counts = vec![0u32; buckets];
    for l in &lat {
        counts[((l / width) as usize).min(buckets - 1)] += 1;
    }
    let cmax = counts.iter().copied().max().unwrap_or(1);
    let mut hist = ChartBuilder::on(&right)
        .caption("latency distribution", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..ymax, 0u32..cmax + cmax / 10 + 1)?;
    hist.configure_mesh().x_desc("ms").y_desc("events (sampled)").draw()?;
    hist.draw_series(counts.iter().enumerate().map(|(i, &c)| {
        let x0 = i as f64 * width;
        Rectangle::new([(x0, 0), (x0 + width, c)], GREEN.mix(0.6).filled())
    }))?;
    root.present()?;
    Ok(())
}
