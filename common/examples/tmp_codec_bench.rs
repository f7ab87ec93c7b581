use std::time::Instant;
use vkm_common::image::*;
fn main() {
    let n = 64 * 1024; // pages = 256 MiB
    let mut data = vec![0u8; n * PAGE_SIZE];
    let mut x = 1u64;
    for (i, p) in data.chunks_mut(PAGE_SIZE).enumerate() {
        match i % 4 {
            0 => {}
            1 => for b in p.iter_mut() { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *b = x as u8; },
            _ => for (j, b) in p.iter_mut().enumerate() { *b = (j % 61) as u8 ^ (i as u8); },
        }
    }
    for comp in [false, true] {
        let t = Instant::now();
        let mut w = ImageWriter::new(Vec::with_capacity(data.len()), 0).unwrap();
        w.set_compression(comp);
        w.write_pages(Space::Mm(0), 0, &data).unwrap();
        let (bytes, st) = w.finish().unwrap();
        let dt = t.elapsed();
        let t = Instant::now();
        let s = verify(&bytes[..]).unwrap();
        let dv = t.elapsed();
        let t = Instant::now();
        let mut r = ImageReader::new(&bytes[..]).unwrap();
        while let Some(_) = r.next_frame().unwrap() {}
        let dr = t.elapsed();
        let gb = data.len() as f64 / 1e9;
        println!("compression={comp}: out {} MB, write {:.2} GB/s, verify {:.2} GB/s, read {:.2} GB/s, pages {}", bytes.len() / 1_000_000, gb / dt.as_secs_f64(), gb / dv.as_secs_f64(), gb / dr.as_secs_f64(), s.pages + 0 * st.pages_written);
    }
}
